"""The launcher's Triton restarts on Triton's own metrics port (iei_runtime/triton.py): under
`iei triton` (compose, Kubernetes) the frontend's /metrics is another container's, and the pod's
scrape annotation names Triton's port."""

from __future__ import annotations

import fake_pb_utils
from fake_pb_utils import install
from iei.contract import TRITON_RESTARTS_ENV

install()  # the stand-in for Triton's utils, and iei_runtime on sys.path

from iei_runtime.triton import RESTARTS_METRIC, show_restarts  # noqa: E402

GIVEN = {TRITON_RESTARTS_ENV: "exited=0,stub_died=2,stub_hung=0,probes_failed=1"}


def shown() -> dict[str, float]:
    [family] = [f for f in fake_pb_utils.MetricFamily.families if f.name == RESTARTS_METRIC]
    assert family.kind == fake_pb_utils.MetricFamily.GAUGE
    return {m.labels["reason"]: m.value() for m in family.metrics}


def first(model: str) -> dict[str, str]:
    return {"model_name": model, "model_instance_name": f"{model}_0_0"}


def test_the_default_models_first_instance_shows_the_count_the_launcher_gave():
    for model in ("iei", "iei_preprocess"):  # single layout, split layout
        fake_pb_utils.MetricFamily.families.clear()
        assert show_restarts({**first(model), "model_instance_name": f"{model}_0_1"}, GIVEN) == []
        kept = show_restarts(first(model), GIVEN)
        # held by the instance: Triton drops a metric, or its family, with its object
        assert len(kept) == 5 and kept[0].name == RESTARTS_METRIC
        assert shown() == {"exited": 0, "stub_died": 2, "stub_hung": 0, "probes_failed": 1}


def test_other_models_or_no_count_show_nothing_and_a_foreign_value_only_warns():
    fake_pb_utils.MetricFamily.families.clear()
    assert show_restarts(first("iei__dino"), GIVEN) == []  # loaded on demand: not always there
    assert show_restarts(first("iei_text"), GIVEN) == []
    assert show_restarts(first("iei"), {}) == []  # a Triton started by hand
    assert show_restarts(first("iei"), {TRITON_RESTARTS_ENV: "many"}) == []
    assert fake_pb_utils.MetricFamily.families == []
