"""The report a reviewer reads: report.json (its schema is `report.schema.json`), a
self-contained report.html from `templates/`, and the pictures of the evidence (`html`)."""
