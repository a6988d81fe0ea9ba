"""Data from files: JSONL (local or S3) with field mappings, the benchmark exported as such
files, and clear errors for bad input."""

import json
from pathlib import Path

import pytest
import yaml

from flminillm.cli import main
from flminillm.config import ConfigError, DataFile, FieldMap, load_config
from flminillm.datafiles import load_examples_from

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_presets_are_recognised_and_mapped(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ])  # fmt: skip
    ex = load_examples_from(DataFile(uri=alpaca))
    assert [(e.prompt, e.answer, e.family) for e in ex] == [
        ("Add\n2 and 3", "5", "all"), ("Say hi", "hi", "all"),
    ]  # fmt: skip
    dolly = _jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Q?", "context": "ctx", "response": "R", "category": "open_qa"},
    ])  # fmt: skip
    (e,) = load_examples_from(DataFile(uri=dolly))
    assert (e.prompt, e.answer, e.family) == ("Q?\nctx", "R", "open_qa")
    own = _jsonl(tmp_path / "o.jsonl", [{"q": "x", "a": "y", "t": "cat"}])
    (e,) = load_examples_from(
        DataFile(uri=own, fields=FieldMap(prompt=["q"], response="a", category="t"))
    )
    assert (e.prompt, e.answer, e.family) == ("x", "y", "cat")


def test_bad_input_names_the_file_line_and_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_examples_from(DataFile(uri=str(tmp_path / "nope.jsonl")))
    missing = _jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"m.jsonl:2 \(data, fields prompt_response.*'response'"):
        load_examples_from(DataFile(uri=missing))
    broken = _jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r"}, "{not json"])
    with pytest.raises(ValueError, match=r"b.jsonl:2: invalid JSON"):
        load_examples_from(DataFile(uri=broken))
    empty = _jsonl(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="the data set is empty"):
        load_examples_from(DataFile(uri=empty))
    unknown = _jsonl(tmp_path / "u.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="give `fields:` explicitly"):
        load_examples_from(DataFile(uri=unknown))
    # the config says which files a files federation needs
    cfg = yaml.safe_load((ROOT / "configs" / "files-example.yaml").read_text())
    del cfg["clients"][1]["data"]
    del cfg["data"]["eval"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"clients\[1\].data.train, data.eval"):
        load_config(path)


def test_read_from_s3(s3_env):
    from flminillm.config import StoreConfig
    from tests.s3_server import s3_client

    endpoint, bucket = s3_env
    body = "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(3))
    s3_client(endpoint).put_object(Bucket=bucket, Key="sft/train.jsonl", Body=body.encode())
    store = StoreConfig(uri=f"s3://{bucket}/store", endpoint_url=endpoint)
    ex = load_examples_from(DataFile(uri=f"s3://{bucket}/sft/train.jsonl"), store)
    assert [e.answer for e in ex] == ["r0", "r1", "r2"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl: cannot read"):
        load_examples_from(DataFile(uri=f"s3://{bucket}/missing.jsonl"), store)


def test_exported_benchmark_reads_back_to_the_same_data(tiny_config, tmp_path):
    """`data export` then a files config: prepare stores the very same objects (so every
    model of the federation is the same as the benchmark's)."""
    from flminillm.steps import prepare

    src = tmp_path / "tiny.yaml"
    src.write_text(yaml.safe_dump(json.loads(tiny_config.to_json())))
    out = tmp_path / "exported"
    assert main(["data", "export", "--config", str(src), "--out", str(out)]) == 0
    files_cfg = load_config(out / "config.yaml")
    assert files_cfg.data.source == "files"
    a, b = prepare(tiny_config), prepare(files_cfg)
    assert a["data"] == b["data"] and a["tokenizer"] == b["tokenizer"]
    assert a["families_by_client"] == b["families_by_client"]


def test_evaluate_on_validation_needs_a_split_and_scores_it(tiny_config, tmp_path):
    """evaluate_on: validation without a validation split is refused with the field and the
    fix; with one, prepare stores the validation sets as what the evaluate step scores, and
    the exported files config carries the validation file."""
    from flminillm.data import generate_benchmark
    from flminillm.steps import prepare

    data = json.loads(tiny_config.to_json())
    data["data"]["evaluate_on"] = "validation"
    with pytest.raises(ConfigError, match="n_val_per_family is 0: set n_val_per_family"):
        load_config(_dump(tmp_path / "bad.yaml", data))
    data["data"]["n_val_per_family"] = 8
    cfg = load_config(_dump(tmp_path / "val.yaml", data))
    bench, _ = generate_benchmark(cfg)
    evals = prepare(cfg)["data"]["eval"]
    data["data"]["evaluate_on"] = "eval"
    reported = prepare(load_config(_dump(tmp_path / "eval.yaml", data)))["data"]
    assert set(evals) == set(bench.val_sets) and evals != reported["eval"]
    assert {k: v for k, v in reported.items() if k != "eval"} == {
        k: v for k, v in prepare(cfg)["data"].items() if k != "eval"
    }  # the same training data under both
    out = tmp_path / "exported"
    assert main(["data", "export", "--config", str(tmp_path / "val.yaml"), "--out", str(out)]) == 0
    files_cfg = load_config(out / "config.yaml")
    assert files_cfg.data.validation is not None and files_cfg.data.evaluate_on == "validation"
    assert prepare(files_cfg)["data"]["eval"] == evals
    no_val = json.loads(files_cfg.to_json())
    no_val["data"]["validation"] = None
    with pytest.raises(ConfigError, match="data.validation is not set: give the validation"):
        load_config(_dump(tmp_path / "files-no-val.yaml", no_val))


def _dump(path, data):
    path.write_text(yaml.safe_dump(data))
    return path
