"""kronserve: one frozen T5, thousands of Compacter-family adapters, mixed per row in every batch."""

__version__ = "0.1.0"
