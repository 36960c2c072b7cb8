"""Reports: the report.json schema, the markdown summary, the plots."""
