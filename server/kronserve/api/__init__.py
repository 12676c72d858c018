"""The HTTP layer: schemas, routes, error mapping. No model code here."""
