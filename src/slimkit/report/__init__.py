"""Results: a JSON schema (`result.json`) and a self-contained HTML report with plots."""
from slimkit.report.html import write_html
from slimkit.report.schema import SCHEMA, environment, new_result, stage_entry, write_json

__all__ = ["SCHEMA", "environment", "new_result", "stage_entry", "write_json", "write_html"]
