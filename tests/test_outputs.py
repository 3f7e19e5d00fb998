"""Nothing of the user's is destroyed: every command refuses a target it would damage,
writes its output whole or not at all, and names the base model as the Hub knows it."""

import ast
import json
import re
import shutil

import mlx.core as mx
import pytest
import yaml
from conftest import assert_refused, cli_flags, run_cli, tree

from mlx_grpo.core import outputs
from mlx_grpo.core.adapters import MLX_WEIGHTS, PEFT_CONFIG, Adapter
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.toy import build_tiny_qwen3
from mlx_grpo.tools.export import export_peft, hub_id, push_to_hub

gguf = pytest.importorskip("gguf")
from test_gguf import _random_model, _write_gguf  # noqa: E402

REPO = "TinyOrg/tiny-qwen3"
RUN_SETTINGS = dict(
    rewards=["mlx_grpo.tasks.toy:allowed_share"],
    num_generations=4,
    prompts_per_step=2,
    max_completion_length=8,
    lora_rank=4,
    lora_alpha=8,
    max_steps=1,
    save_steps=0,
)


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    settings = dict(model=str(tiny_model_dir), data=str(toy_data), output_dir=str(out))
    train(**settings, **RUN_SETTINGS, show_progress=False)
    return out


@pytest.fixture
def model_copy(tmp_path):
    """A model folder of the user's that a command must not touch."""
    return build_tiny_qwen3(tmp_path / "my-model")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("where", ["the-folder", "inside", "symlink"])
def test_fuse_into_the_base_models_folder_is_refused(run_dir, model_copy, tmp_path, where):
    target = {"the-folder": model_copy, "inside": model_copy / "fused"}.get(where)
    if where == "symlink":
        target = tmp_path / "link"
        target.symlink_to(model_copy)
    before = tree(model_copy)
    result = run_cli("fuse", "--model", model_copy, "--adapter", run_dir, "--output", target)
    relation = "is inside" if where == "inside" else "is"
    assert_refused(result, f"{relation} the base model", "Choose a new folder for --output")
    assert tree(model_copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["my-model"] + (["link"] if where == "symlink" else [])
    )


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("holds", ["notes", "adapter"])
def test_train_refuses_a_foreign_non_empty_folder(quick_settings, tmp_path, overwrite, holds):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    if holds == "adapter":
        (out / MLX_WEIGHTS).write_bytes(b"someone's adapter")
    before = tree(out)
    flags = cli_flags({**quick_settings, "max_steps": 1, "output_dir": str(out)})
    result = run_cli("train", *flags, *(["--overwrite"] if overwrite else []))
    if holds == "notes":
        assert_refused(result, "is not empty and is not an mlx-grpo run", "notes.txt")
    else:
        assert_refused(result, "already holds an adapter", MLX_WEIGHTS, "--overwrite or not")
    if overwrite and holds == "notes":
        assert "--overwrite replaces only a run that mlx-grpo made" in result.output
    assert tree(out) == before


def test_train_overwrite_replaces_its_own_run_only(quick_settings, tmp_path):
    out = tmp_path / "run"
    settings = {**quick_settings, "max_steps": 1, "output_dir": str(out)}
    assert run_cli("train", *cli_flags(settings)).exit_code == 0
    assert outputs.kind_of(out) == "run"
    (out / "my-notes.txt").write_text("kept")
    assert run_cli("train", *cli_flags(settings), "--overwrite").exit_code == 0
    assert (out / "my-notes.txt").read_text() == "kept"  # only the run's own files go
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("into", ["another-run", "its-own-folder"])
def test_export_into_a_run_or_its_source_folder_is_refused(run_dir, tmp_path, into):
    source = tmp_path / "adapter"
    Adapter.load(run_dir).save(source)
    target = run_dir if into == "another-run" else source
    before = tree(target)
    result = run_cli("export", source, "--output", target)
    if into == "another-run":
        assert_refused(result, "holds a training run made by mlx-grpo, not a PEFT adapter export")
    else:
        assert_refused(result, "is the source adapter")
    assert tree(target) == before


def test_import_into_an_existing_model_is_refused(run_dir, model_copy, tmp_path):
    peft_dir = export_peft(run_dir, tmp_path / "peft")
    before = tree(model_copy)
    result = run_cli("import", peft_dir, "--output", model_copy)
    assert_refused(result, "already holds a model", "was not written by mlx-grpo")
    assert tree(model_copy) == before


def test_convert_into_an_existing_model_is_refused_and_reconverts_its_own(model_copy, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "qwen3", _random_model("qwen3"))
    before = tree(model_copy)
    assert_refused(run_cli("convert", path, "--output", model_copy), "already holds a model")
    assert tree(model_copy) == before

    out = tmp_path / "converted"
    assert run_cli("convert", path, "--output", out).exit_code == 0
    assert outputs.kind_of(out) == "converted"
    assert run_cli("convert", path, "--output", out).exit_code == 0  # its own: replaced


# --------------------------------------------------------------------------- whole or nothing


def test_a_crash_mid_export_keeps_the_previous_export(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "peft"
    export_peft(run_dir, out, base_model="Org/first")
    before = tree(out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    # The weights and config are written by then; the card is the last file.
    monkeypatch.setattr("mlx_grpo.tools.export.model_card", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_peft(run_dir, out, base_model="Org/second")
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no half folder beside it


def test_re_export_replaces_its_own_export_but_not_files_added_to_it(run_dir, tmp_path):
    out = tmp_path / "peft"
    export_peft(run_dir, out, base_model="Org/first")
    result = run_cli("export", run_dir, "--output", out, "--base-model", "Org/second")
    assert result.exit_code == 0, result.output
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "Org/second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]

    (out / "my-eval.txt").write_text("hand-written")
    before = tree(out)
    assert_refused(run_cli("export", run_dir, "--output", out), "my-eval.txt", "Move it out")
    assert tree(out) == before


def test_a_crash_between_the_renames_is_undone_by_the_next_write(run_dir, tmp_path):
    out = tmp_path / "peft"
    export_peft(run_dir, out)
    before = tree(out)
    dead_pid = 4_194_305  # above Linux's largest pid
    out.rename(tmp_path / f".peft.old-{dead_pid}")
    (tmp_path / f".peft.partial-{dead_pid}").mkdir()
    outputs.mark(tmp_path / f".peft.partial-{dead_pid}", "peft")
    with outputs.build(out, "peft") as folder:
        assert tree(out) == before  # the previous export is back in place first
        (folder / "x").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    assert (out / "x").read_text() == "new"


# --------------------------------------------------------------------------- the Hub id


def test_export_of_a_run_on_a_converted_gguf_names_the_hub_id(toy_data, tmp_path):
    gguf_file = tmp_path / "tiny.gguf"
    _write_gguf(
        gguf_file,
        "qwen3",
        _random_model("qwen3"),
        meta={"general.source.huggingface.repository": REPO},
    )
    model = tmp_path / "converted"
    assert run_cli("convert", gguf_file, "--output", model).exit_code == 0
    run = tmp_path / "run"
    train(
        model=str(model),
        data=str(toy_data),
        output_dir=str(run),
        **RUN_SETTINGS,
        show_progress=False,
    )
    out = export_peft(run, tmp_path / "peft")
    assert json.loads((out / PEFT_CONFIG).read_text())["base_model_name_or_path"] == REPO
    assert front_matter((out / "README.md").read_text())["base_model"] == REPO
    assert str(tmp_path) not in (out / "README.md").read_text()  # no local path leaks
    assert hub_id(str(gguf_file)) == REPO  # a run started on the .gguf itself


@pytest.mark.parametrize("known_as", ["hub-id", "config-name", "local-only"])
def test_export_names_the_base_by_its_hub_id_when_one_is_known(tmp_path, known_as):
    model = build_tiny_qwen3(tmp_path / "model")
    if known_as == "config-name":  # a local copy of a Hub model keeps its name in config.json
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "_name_or_path": REPO}))
    trained_on = REPO if known_as == "hub-id" else str(model)
    source = tmp_path / "adapter"
    q_proj = "model.layers.0.self_attn.q_proj"
    a, b = {q_proj: mx.zeros((64, 2))}, {q_proj: mx.zeros((2, 96))}
    Adapter(2, 4.0, lora_a=a, lora_b=b, base_model=trained_on).save(source)
    out = export_peft(source, tmp_path / "peft")
    recorded = json.loads((out / PEFT_CONFIG).read_text())["base_model_name_or_path"]
    assert recorded == (str(model) if known_as == "local-only" else REPO)


def test_push_with_only_a_local_base_is_refused_before_anything_is_written(
    run_dir, tmp_path, hub_calls
):
    result = run_cli("export", run_dir, "--output", tmp_path / "peft", "--push-to-hub", "me/x")
    assert_refused(result, "cannot go to the Hub", "--base-model")
    assert hub_calls == [] and not (tmp_path / "peft").exists()

    local = export_peft(run_dir, tmp_path / "local")  # a local export records the path
    config = json.loads((local / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == Adapter.load(run_dir).base_model
    assert "not a Hub id" in (local / "README.md").read_text()
    with pytest.raises(ValueError, match="--base-model"):
        push_to_hub(local, "me/x")
    assert hub_calls == []


# --------------------------------------------------------------------------- escaping


def front_matter(card: str) -> dict:
    """The YAML between the first two lines that are exactly `---`, as the Hub reads it."""
    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


@pytest.mark.parametrize(
    "base",
    ["x\n---\nevil: true", "a | b\n| evil | row |", "``` code\nimport os", "'quote\" \\ end"],
)
def test_names_in_the_model_card_cannot_inject_keys_rows_or_code(run_dir, tmp_path, base):
    def table(card):
        return [line for line in card.split("\n") if line.startswith("|")]

    plain = (export_peft(run_dir, tmp_path / "plain", base_model="Org/x") / "README.md").read_text()
    # --base-model takes only a Hub id or a folder; any name can still come from the adapter.
    source = tmp_path / "source"
    shutil.copytree(run_dir, source)
    config = json.loads((source / "adapter_config.json").read_text())
    config["mlx_grpo"]["base_model"] = base
    (source / "adapter_config.json").write_text(json.dumps(config))
    card = (export_peft(source, tmp_path / "peft") / "README.md").read_text()
    assert set(front_matter(card)) == {"library_name", "tags"}  # not a Hub id: no base_model
    rows = table(card)
    assert len(rows) == len(table(plain)) > 10
    for row in rows[2:]:
        assert len(re.split(r"(?<!\\)\|", row)) == 4, row  # two cells, no more
    call = next(line for line in card.split("\n") if "from_pretrained(" in line and "Auto" in line)
    assert ast.literal_eval(call.split("from_pretrained(", 1)[1][:-1]) == base
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == base


def test_a_hub_id_goes_into_the_front_matter(run_dir, tmp_path):
    card = (export_peft(run_dir, tmp_path / "p", base_model=REPO) / "README.md").read_text()
    assert front_matter(card) == {
        "base_model": REPO,
        "library_name": "peft",
        "tags": ["lora", "grpo", "mlx-grpo"],
    }


def test_demo_refuses_a_foreign_folder_and_reruns_in_its_own(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = run_cli("demo", "--output-dir", mine, "--max-steps", "1")
    assert_refused(result, "--output-dir", "thesis.tex", "was not written by mlx-grpo")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]

    demo = tmp_path / "demo"
    for _ in range(2):
        result = run_cli("demo", "--output-dir", demo, "--max-steps", "1")
        assert result.exit_code == 0, result.output
    assert outputs.kind_of(demo) == "demo" and outputs.kind_of(demo / "run") == "run"


def test_outputs_never_write_through_a_symlinked_file(tmp_path):
    """Adapter.save replaces a symlink at a file's place instead of writing where it points."""
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").symlink_to(victim)
    adapter = Adapter(2, 4.0, lora_a={"m": mx.zeros((3, 2))}, lora_b={"m": mx.zeros((2, 3))})
    adapter.save(folder)
    assert victim.read_text() == "precious"
    assert not (folder / "adapter_config.json").is_symlink()
    assert Adapter.load(folder).rank == 2


def test_finders_ds_store_does_not_block_a_re_export(run_dir, tmp_path):
    out = tmp_path / "peft"
    assert run_cli("export", run_dir, "-o", out).exit_code == 0
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # the folder was opened in Finder
    assert run_cli("export", run_dir, "-o", out).exit_code == 0
    (out / "my-folder").mkdir()  # a folder of the user's is theirs, even empty
    assert_refused(run_cli("export", run_dir, "-o", out), "my-folder was added or changed")
    assert (out / "my-folder").is_dir()


def test_a_local_folder_shaped_like_a_hub_id_is_not_pushed(
    run_dir, tiny_model_dir, tmp_path, hub_calls, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "qwen3")  # a folder, not a repository
    result = run_cli(
        "export", run_dir, "-o", "peft", "--base-model", "models/qwen3", "--push-to-hub", "me/x"
    )
    assert_refused(result, "known only as 'models/qwen3', not a Hub id", "--base-model")
    assert hub_calls == [] and not (tmp_path / "peft").exists()
