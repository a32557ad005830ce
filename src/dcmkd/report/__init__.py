"""Results tables (mean(std) over seeds beside the papers' numbers), curves and figures."""
from dcmkd.report.results import CellStats, RunResult
from dcmkd.report.table import collect, markdown, to_csv, write_experiment_report
from dcmkd.report.runs import report_runs

__all__ = ["CellStats", "RunResult", "collect", "markdown", "to_csv", "write_experiment_report",
           "report_runs"]
