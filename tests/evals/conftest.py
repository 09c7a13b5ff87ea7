"""Helpers shared by the eval tests."""

import math
import re

import pytest


def parse_tables(markdown: str) -> dict[str, list[list[str]]]:
    """Every markdown table of a report, by the `## ` heading above it: a list of rows (header first), cells
    stripped."""
    tables: dict[str, list[list[str]]] = {}
    heading = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and not re.fullmatch(r"\|(?:---\|)+", line):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


@pytest.fixture
def report_tables():
    return parse_tables


def assert_report_matches(markdown: str, metrics: dict[int, dict]) -> None:
    """Every metric of every round appears in its suite's table in report.md with the same value."""
    found = parse_tables(markdown)
    for suite in {s for m in metrics.values() for s in m}:
        header, *rows = found[f"Eval suite `{suite}`"]
        assert header == ["metric", *[f"round {r}" for r in sorted(metrics)]]
        by_metric = {row[0]: row[1:] for row in rows}
        for i, r in enumerate(sorted(metrics)):
            for name, value in metrics[r].get(suite, {}).items():
                cell = by_metric[name][i]
                if value is None:
                    assert cell == "-", (suite, name, r)
                else:
                    assert math.isclose(float(cell), value, rel_tol=1e-3, abs_tol=1e-12), (suite, name, r, cell)


@pytest.fixture
def report_matches():
    return assert_report_matches
