"""The dashboard's writer and plugin routes, on event files written by `write_figures` and read by TensorBoard's own
multiplexer and data provider (what `tensorboard --load_fast=false` uses)."""

import json
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_ingester, event_file_loader, plugin_event_multiplexer
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.compat.proto import summary_pb2, types_pb2
from tensorboard.plugins import base_plugin
from torch.utils.tensorboard import SummaryWriter
from werkzeug import test as werkzeug_test
from werkzeug import wrappers

from lightning_cka.dashboard.plugin import CKADashboardPlugin
from lightning_cka.dashboard.summaries import figure_summary, summary_tag, write_figures
from lightning_cka.figures.spec import Curves, Dots, Figure, Heatmap, Line, Scatter, Series, to_json

LAYERS = ("blocks.0", "blocks.1", "blocks.2")
STEPS = (0, 10, 20, 30)
TIMES = "\N{MULTIPLICATION SIGN}"  # as the dashboard writes it


def cka(step: int) -> np.ndarray:
    """The intra heatmap at `step`: cell (r, c) holds r/10 + c/100 + step/1000, one NaN cell."""
    r, c = np.mgrid[0:3, 0:3]
    values = r / 10 + c / 100 + step / 1000
    values[0, 2] = np.nan
    return values


def probe_figures(step: int, probe: str = "p-1") -> list[Figure]:
    meta = {"step": step, "run": "run", "probe": probe, "num_examples": 64}
    values = cka(step)
    intra = Heatmap(
        values, LAYERS, LAYERS, error=values / 10, null=np.full((3, 3), 0.05), marked=values < 0.025, mark_label="null"
    )
    heads = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, np.nan]]) + step
    dots = Dots(LAYERS, (Series("", heads),), y_label="px", lines=(Line(25.0, "local threshold"),))
    curves = Curves(LAYERS, (Series("train", np.array([0.1, 0.2, 0.3]) + step / 100),), y_label="accuracy")
    scatter = Scatter((Series("blocks.0", np.array([[1.0, 2.0], [3.0, 4.0 + step]])),), x_label="px", y_label="CKA")
    return [
        Figure("cka/intra", "CKA between layers", (intra,), caption="how to read it", meta=meta),
        Figure("attention/mean_distance", "Mean attention distance", (dots,), meta=meta),
        Figure("residual/norm_ratio", "Norm", (Heatmap(values[:, :2], LAYERS, ("attn", "mlp")), curves), meta=meta),
        Figure("attention/heads_vs_reference", "Heads", (scatter,), meta=meta),
    ]


def write_run(folder: Path, steps=STEPS, prefix: str = "", probe: str = "p-1") -> None:
    writer = SummaryWriter(str(folder))
    for step in steps:
        write_figures(writer, probe_figures(step, probe), step, prefix=prefix)
    writer.close()


def client_for(logdir: Path, samples: dict[str, int] | None = None, provider_class=MultiplexerDataProvider):
    """A test client for the plugin in a TensorBoard app over `logdir`, sampled as `tensorboard` samples."""
    samples = {"lightning_cka": 0} if samples is None else samples
    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
        tensor_size_guidance={**data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE, **samples},
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = provider_class(multiplexer, str(logdir))
    context = base_plugin.TBContext(logdir=str(logdir), data_provider=provider, sampling_hints=samples)
    plugin = CKADashboardPlugin(context)
    app = application.TensorBoardWSGI([plugin], data_provider=provider)
    return werkzeug_test.Client(app, wrappers.Response), provider


def get(client, route: str, **params):
    response = client.get(f"/data/plugin/lightning_cka/{route}", query_string=params)
    body = response.get_data()
    return response.status_code, json.loads(body) if response.mimetype == "application/json" else body


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    write_run(root / "vit")
    write_run(root / "two_monitors", steps=(5,), prefix="coarse")
    writer = SummaryWriter(str(root / "scalars_only"))
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.close()
    return root


@pytest.fixture(scope="module")
def client(logdir):
    return client_for(logdir)[0]


def test_write_figures_writes_one_string_tensor_summary_per_figure(tmp_path):
    write_run(tmp_path, steps=(7,), prefix="coarse")
    (events,) = tmp_path.glob("events.out.tfevents.*")
    values = [
        (event.step, value)
        for event in event_file_loader.LegacyEventFileLoader(str(events)).Load()
        for value in event.summary.value
    ]
    assert [v.tag for _, v in values] == [  # tags of their own: the Images tab's PNGs have the figures' tags
        "coarse/cka/intra/figure",
        "coarse/attention/mean_distance/figure",
        "coarse/residual/norm_ratio/figure",
        "coarse/attention/heads_vs_reference/figure",
    ]
    step, value = values[0]
    assert step == 7
    assert value.metadata.plugin_data.plugin_name == "lightning_cka"
    assert value.metadata.plugin_data.content == b'{"version": 1}'
    assert value.metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    assert value.metadata.display_name == "CKA between layers"
    assert value.metadata.summary_description == "how to read it"
    assert value.tensor.dtype == types_pb2.DT_STRING
    assert list(value.tensor.tensor_shape.dim) == []
    (payload,) = value.tensor.string_val
    figure = json.loads(payload.decode("utf-8"))
    assert figure == to_json(probe_figures(7)[0])
    assert figure["panels"][0]["values"][1][2] == pytest.approx(0.1 + 0.02 + 0.007)
    assert figure["panels"][0]["values"][0][2] is None  # NaN is null: strict JSON


def test_non_finite_numbers_become_null():
    summary = figure_summary(Figure("cka/intra", "t", (), meta={"loss": float("nan"), "n": np.float32("inf")}))
    assert json.loads(summary.value[0].tensor.string_val[0])["meta"] == {"loss": None, "n": None}


def test_entry_point_loads_the_plugin():
    (point,) = [p for p in entry_points(group="tensorboard_plugins") if p.name == "lightning_cka"]
    plugin_class = point.load()
    assert plugin_class is CKADashboardPlugin
    plugin = plugin_class(base_plugin.TBContext())
    assert plugin.plugin_name == "lightning_cka"
    assert plugin.frontend_metadata() == base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="CKA")
    assert plugin.data_plugin_names() == ("lightning_cka",)
    assert plugin.is_active() is False


def test_tab_is_enabled_only_where_a_run_has_figures(logdir, tmp_path):
    client, _ = client_for(logdir)
    listing = json.loads(client.get("/data/plugins_listing").get_data())["lightning_cka"]
    assert listing["enabled"] is True
    assert listing["tab_name"] == "CKA"
    assert listing["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/lightning_cka/index.js"}
    scalars_only = tmp_path / "scalars"
    SummaryWriter(str(scalars_only / "run")).add_scalar("loss", 1.0, 0)
    client, _ = client_for(scalars_only)
    assert json.loads(client.get("/data/plugins_listing").get_data())["lightning_cka"]["enabled"] is False


def test_index_js_is_served_as_a_module(client):
    response = client.get("/data/plugin/lightning_cka/index.js")
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert b"export async function render()" in response.get_data()


def test_runs_lists_runs_with_figures_and_their_tags(client):
    code, body = get(client, "runs")
    assert code == 200
    assert [r["run"] for r in body["runs"]] == ["two_monitors", "vit"]  # scalars_only has no figures
    vit = body["runs"][1]
    assert [t["tag"] for t in vit["tags"]] == sorted(f.tag for f in probe_figures(0))
    intra = next(t for t in vit["tags"] if t["tag"] == "cka/intra")
    assert intra == {"tag": "cka/intra", "title": "CKA between layers", "caption": "how to read it", "max_step": 30}
    assert "coarse/cka/intra" in [t["tag"] for t in body["runs"][0]["tags"]]
    assert body["samples_per_plugin"] == 0
    assert body["skipped"] == []


def test_steps(client):
    assert get(client, "steps", run="vit", tag="cka/intra")[1]["steps"] == list(STEPS)
    assert get(client, "steps", run="two_monitors", tag="coarse/cka/intra")[1]["steps"] == [5]


def test_figure_at_a_step_holds_the_values_written(client):
    code, body = get(client, "figure", run="vit", tag="cka/intra", step=20)
    assert code == 200
    assert (body["run"], body["tag"], body["step"]) == ("vit", "cka/intra", 20)
    heatmap = body["figure"]["panels"][0]
    assert heatmap["kind"] == "heatmap"
    assert heatmap["rows"] == list(LAYERS)
    assert heatmap["values"][2][1] == pytest.approx(0.2 + 0.01 + 0.02)
    assert heatmap["error"][2][1] == pytest.approx(0.023)
    assert heatmap["values"][0][2] is None
    assert heatmap["marked"][0][0] is True  # 0.02 < 0.025
    assert body["figure"]["meta"] == {"step": 20, "run": "run", "probe": "p-1", "num_examples": 64}


def test_figure_without_step_is_the_last(client):
    assert get(client, "figure", run="vit", tag="cka/intra")[1]["step"] == 30


@pytest.mark.parametrize(
    ("params", "code", "says"),
    [
        ({"run": "vit", "tag": "cka/intra", "step": 21}, 404, "step 21"),
        ({"run": "nope", "tag": "cka/intra"}, 404, "has no figure"),
        ({"run": "scalars_only", "tag": "train/loss"}, 404, "has no figure"),
        ({"run": "vit"}, 400, "required"),
        ({"run": "vit", "tag": "cka/intra", "step": "last"}, 400, "integer"),
    ],
)
def test_figure_errors_are_json(client, params, code, says):
    status, body = get(client, "figure", **params)
    assert status == code
    assert says in body["error"]


def test_history_of_a_heatmap_cell(client):
    code, body = get(client, "history", run="vit", tag="cka/intra", row=2, col=1)
    assert code == 200
    assert body["steps"] == list(STEPS)
    assert body["label"] == f"blocks.2 {TIMES} blocks.1"
    (series,) = body["series"]
    assert series["values"] == pytest.approx([0.21 + s / 1000 for s in STEPS])
    assert series["error"] == pytest.approx([0.021 + s / 10000 for s in STEPS])
    assert body["null"] == pytest.approx([0.05] * 4)
    assert get(client, "history", run="vit", tag="cka/intra", row=0, col=0)[1]["marked"] == [True, True, True, False]
    assert get(client, "history", run="vit", tag="cka/intra", row=0, col=2)[1]["series"][0]["values"] == [None] * 4


def test_history_of_dots_curves_and_scatter(client):
    _, dots = get(client, "history", run="vit", tag="attention/mean_distance", x=2)
    assert [s["label"] for s in dots["series"]] == ["head 0", "head 1"]
    assert dots["series"][0]["values"] == pytest.approx([50.0 + s for s in STEPS])
    assert dots["series"][1]["values"] == [None] * 4
    assert dots["lines"] == [{"value": 25.0, "label": "local threshold", "axis": "y", "style": "dashed"}]
    _, curves = get(client, "history", run="vit", tag="residual/norm_ratio", panel=1, x=1)
    assert curves["series"][0]["label"] == "train"
    assert curves["series"][0]["values"] == pytest.approx([0.2 + s / 100 for s in STEPS])
    _, heatmap = get(client, "history", run="vit", tag="residual/norm_ratio", panel=0, row=1, col=1)
    assert heatmap["label"] == f"blocks.1 {TIMES} mlp"
    _, scatter = get(client, "history", run="vit", tag="attention/heads_vs_reference", series=0, point=1)
    assert [s["values"] for s in scatter["series"]] == [[3.0] * 4, pytest.approx([4.0 + s for s in STEPS])]


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"tag": "cka/intra", "row": 3, "col": 0}, "`row` 3 is out of range"),
        ({"tag": "cka/intra", "row": 0}, "`col` must be an integer"),
        ({"tag": "cka/intra", "panel": 1, "row": 0, "col": 0}, "panel 1 does not exist"),
        ({"tag": "attention/mean_distance", "x": -1}, "`x` -1 is out of range"),
    ],
)
def test_history_errors_are_json(client, params, says):
    status, body = get(client, "history", run="vit", **params)
    assert status == 400
    assert says in body["error"]


def test_history_of_a_run_whose_layers_changed(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, n in ((0, 2), (1, 3)):
        names = LAYERS[:n]
        figure = Figure("cka/intra", "t", (Heatmap(np.full((n, n), 0.5 + step), names, names),))
        write_figures(writer, [figure], step)
    writer.close()
    client, _ = client_for(tmp_path)
    assert get(client, "history", run="run", tag="cka/intra", row=2, col=2)[1]["series"][0]["values"] == [None, 1.5]


def test_empty_logdir(tmp_path):
    client, _ = client_for(tmp_path)
    assert get(client, "runs") == (200, {"runs": [], "skipped": [], "samples_per_plugin": 0})
    assert get(client, "steps", run="vit", tag="cka/intra")[0] == 404


def test_truncated_event_file(tmp_path):
    write_run(tmp_path / "run")
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[: len(data) - 300])  # a writer killed mid-record: the last step is cut short
    client, _ = client_for(tmp_path)
    code, body = get(client, "steps", run="run", tag="cka/intra")
    assert code == 200
    assert body["steps"] == list(STEPS)  # cka/intra is the first figure of the last step: it is whole
    assert get(client, "steps", run="run", tag="attention/heads_vs_reference")[1]["steps"] == list(STEPS[:-1])
    assert get(client, "figure", run="run", tag="cka/intra", step=30)[1]["figure"]["panels"][0]["values"][1][1] == (
        pytest.approx(0.11 + 0.03)
    )


def test_garbage_tensor_is_a_json_error_and_history_skips_it(tmp_path):
    write_run(tmp_path / "run", steps=(0,))
    bad = figure_summary(probe_figures(1)[0], summary_tag("cka/intra"))  # the same series as write_run's
    bad.value[0].tensor.string_val[0] = b'{"panels": [{"kind": "heatm'
    writer = SummaryWriter(str(tmp_path / "run"))
    writer._get_file_writer().add_summary(bad, 1)
    writer.close()
    client, _ = client_for(tmp_path)
    code, body = get(client, "figure", run="run", tag="cka/intra", step=1)
    assert code == 422
    assert "not valid JSON" in body["error"]
    code, body = get(client, "history", run="run", tag="cka/intra", row=1, col=1)
    assert code == 200
    assert body["steps"] == [0]


def strict_json(body: bytes):
    """JSON as a browser parses it: NaN and Infinity literals are errors (Python's json takes them)."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


CRAFTED = {
    "a scalar heatmap": b'{"panels": [{"kind": "heatmap", "rows": ["a"], "cols": ["b"], "values": 5}]}',
    "ragged values": b'{"panels": [{"kind": "heatmap", "rows": ["a", "b"], "cols": ["c", "d"], '
    b'"values": [[1, 2], [3]]}]}',
    "a NaN literal": b'{"panels": [{"kind": "heatmap", "rows": ["a"], "cols": ["b"], "values": [[NaN]]}]}',
    "fewer names than rows": b'{"panels": [{"kind": "heatmap", "rows": ["a"], "cols": ["b"], "values": [[1], [2]]}]}',
    "text for numbers": b'{"panels": [{"kind": "curves", "x": ["a"], "series": [{"label": "", "values": ["x"]}]}]}',
    "an unknown kind": b'{"panels": [{"kind": "pie", "values": [1]}]}',
    "a scatter of triples": b'{"panels": [{"kind": "scatter", "series": [{"label": "", "values": [[1, 2, 3]]}]}]}',
}


@pytest.mark.parametrize("payload", list(CRAFTED.values()), ids=list(CRAFTED))
def test_crafted_figure_tensors_get_a_json_4xx_and_history_skips_them(tmp_path, payload):
    write_run(tmp_path / "run", steps=(0,))
    crafted = figure_summary(probe_figures(1)[0], summary_tag("cka/intra"))
    crafted.value[0].tensor.string_val[0] = payload
    writer = SummaryWriter(str(tmp_path / "run"))
    writer._get_file_writer().add_summary(crafted, 1)
    writer.close()
    client, _ = client_for(tmp_path)
    response = client.get(
        "/data/plugin/lightning_cka/figure", query_string={"run": "run", "tag": "cka/intra", "step": 1}
    )
    assert response.status_code == 422
    assert "error" in strict_json(response.get_data())
    for params in ({"row": 1, "col": 1}, {"row": 0, "col": 0}):
        response = client.get(
            "/data/plugin/lightning_cka/history", query_string={"run": "run", "tag": "cka/intra", **params}
        )
        assert response.status_code == 200
        assert strict_json(response.get_data())["steps"] == [0]


def test_a_figure_under_its_old_and_its_current_tag_is_read_from_the_current_one(tmp_path):
    write_run(tmp_path / "run", steps=(0, 5))  # under cka/intra/figure
    writer = SummaryWriter(str(tmp_path / "run"))
    writer._get_file_writer().add_summary(figure_summary(probe_figures(9)[0]), 9)  # the bare tag of older versions
    writer.close()
    client, _ = client_for(tmp_path)
    assert get(client, "steps", run="run", tag="cka/intra")[1]["steps"] == [0, 5]


def test_newer_metadata_version_is_skipped(tmp_path):
    summary = figure_summary(probe_figures(0)[0])
    summary.value[0].metadata.plugin_data.content = b'{"version": 2}'
    writer = SummaryWriter(str(tmp_path / "run"))
    writer._get_file_writer().add_summary(summary, 0)
    writer.close()
    client, _ = client_for(tmp_path)
    body = get(client, "runs")[1]
    assert body["runs"] == []
    assert body["skipped"] == [{"run": "run", "tag": "cka/intra", "reason": "metadata version 2"}]


@pytest.mark.parametrize(("samples", "kept"), [({}, 10), ({"lightning_cka": 0}, 15), ({"lightning_cka": 4}, 4)])
def test_tensorboard_keeps_a_sample_of_steps_unless_told(tmp_path, samples, kept):
    # TensorBoard's Python loader keeps 10 tensors per tag of an unknown plugin; --samples_per_plugin changes that.
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(15):
        write_figures(writer, probe_figures(step)[:1], step)
    writer.close()
    client, _ = client_for(tmp_path, samples)
    steps = get(client, "steps", run="run", tag="cka/intra")[1]["steps"]
    assert len(steps) == kept
    assert steps[-1] == 14  # the reservoir always keeps the last step


def test_reads_go_through_the_data_provider_with_the_experiment_id(logdir):
    seen = set()

    class Spy(MultiplexerDataProvider):
        def list_tensors(self, ctx=None, *, experiment_id, **kwargs):
            seen.add(experiment_id)
            return super().list_tensors(ctx, experiment_id=experiment_id, **kwargs)

        def read_tensors(self, ctx=None, *, experiment_id, **kwargs):
            seen.add(experiment_id)
            return super().read_tensors(ctx, experiment_id=experiment_id, **kwargs)

    client, _ = client_for(logdir, provider_class=Spy)
    response = client.get("/experiment/exp42/data/plugin/lightning_cka/figure?run=vit&tag=cka/intra&step=0")
    assert response.status_code == 200
    assert seen == {"exp42"}


def test_a_new_step_is_seen_after_reload(tmp_path):
    write_run(tmp_path / "run", steps=(0, 10))
    client, provider = client_for(tmp_path)
    assert get(client, "history", run="run", tag="cka/intra", row=1, col=1)[1]["steps"] == [0, 10]
    write_run(tmp_path / "run", steps=(20,))
    provider._multiplexer.Reload()
    assert get(client, "steps", run="run", tag="cka/intra")[1]["steps"] == [0, 10, 20]
    assert get(client, "history", run="run", tag="cka/intra", row=1, col=1)[1]["steps"] == [0, 10, 20]
    assert get(client, "figure", run="run", tag="cka/intra")[1]["step"] == 20
