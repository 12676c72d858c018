"""Adapter file formats: the native one, and (later) importers that turn foreign formats into it."""
