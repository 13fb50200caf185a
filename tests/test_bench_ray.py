"""`python -m bench.ray`'s report: its table from known results, and the place in docs/bulk.md
it rewrites (a separate file from tests/test_bench.py, which others edit)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ray as bench_ray  # noqa: E402


def results(load: float) -> dict:
    meta = {"command": ".venv/bin/python -m bench.ray", "date": "2026-12-05 08:00 UTC",
            "load_before": load, "cpu": "AMD EPYC", "cores": 2, "model": "ViT-B/16",
            "images": 64}  # fmt: skip
    rows = [
        {"mode": "--model", "actors": 2, "cpus_each": 1, "img_s": 3.0, "img_s_per_actor": 1.5,
         "startup_s": 40.0, "images": 64, "seconds": 60.0, "load": 7.5,
         "date": "2026-12-05 08:01 UTC"},
    ]  # fmt: skip
    return {"meta": meta, "rows": rows}


def test_the_table_names_the_command_and_says_when_the_machine_was_loaded():
    text = bench_ray.render(results(load=9.0))
    assert "`.venv/bin/python -m bench.ray`" in text and "under load" in text
    assert "| --model | 2 | 1 | 3.0 | 1.5 | 40 s | 7.5 | 2026-12-05 08:01 UTC |" in text
    assert "under load" not in bench_ray.render(results(load=0.2))


def test_docs_bulk_md_has_the_place_the_bench_writes():
    text = (ROOT / "docs" / "bulk.md").read_text()
    assert text.count(bench_ray.BEGIN) == 1 and text.count(bench_ray.END) == 1
    assert text.index(bench_ray.BEGIN) < text.index(bench_ray.END)
