"""Data from files: JSON lines at a local path or s3://bucket/key, mapped to Examples.

A record becomes an `Example(family=category, prompt, answer=response)` through a field
mapping (`flminillm.config.FieldMap` or a preset name; `auto` picks the preset from the
first record's keys). Every error names the file, the line and the mapping in use, and
what to change. `export_benchmark` writes the procedural benchmark in this form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flminillm.config import FIELD_PRESETS, FieldMap

if TYPE_CHECKING:
    from flminillm.config import DataFile, StoreConfig
    from flminillm.data import Example

DEFAULT_CATEGORY = "all"
MAX_LINE_BYTES = 1 << 20  # a record over 1 MiB is refused, not read into memory whole


def _lines(uri: str, store: StoreConfig | None) -> Iterator[str]:
    if uri.startswith("s3://"):
        import boto3

        bucket, _, key = uri[len("s3://") :].partition("/")
        kw: dict[str, Any] = {"region_name": store.region if store else "us-east-1"}
        if store is not None and store.endpoint_url:
            kw["endpoint_url"] = store.endpoint_url
        try:
            body = boto3.client("s3", **kw).get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as e:  # botocore's NoSuchKey, NoSuchBucket, credentials...
            raise FileNotFoundError(f"{uri}: cannot read it ({e}); check the URI and the "
                                    "S3 credentials in the environment") from None  # fmt: skip
        for raw in body.iter_lines(keepends=True):
            yield raw.decode("utf-8")
        return
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no such file (relative paths are from the working "
                                f"directory, {Path.cwd()})")  # fmt: skip
    with path.open(encoding="utf-8") as fh:
        yield from fh


def read_records(uri: str, store: StoreConfig | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a bad line is an error naming it."""
    for lineno, line in enumerate(_lines(uri, store), start=1):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) > MAX_LINE_BYTES:
            raise ValueError(f"{uri}:{lineno}: record longer than {MAX_LINE_BYTES} bytes")
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{uri}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def guess_preset(record: dict) -> str:
    """The preset whose fields the record has (Alpaca, Dolly, ours, text, prompt/response)."""
    keys = set(record)
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"prompt", "answer"} <= keys:
        return "flminillm"
    if "prompt" in keys:
        return "prompt_response"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"cannot tell the field mapping from the keys {sorted(keys)}; give `fields:` "
        "explicitly, e.g. {prompt: [question], response: answer, category: topic}"
    )


def resolve_fields(fields: str | FieldMap, first: dict | None) -> tuple[str, FieldMap]:
    """(a name for messages, the mapping) of `fields`, guessing from `first` for auto."""
    if isinstance(fields, FieldMap):
        return "explicit", fields
    name = guess_preset(first or {}) if fields == "auto" else fields
    return name, FieldMap(**FIELD_PRESETS[name])


def load_examples_from(
    spec: DataFile,
    store: StoreConfig | None = None,
    *,
    need_response: bool = True,
    what: str = "data",
) -> list[Example]:
    """Every record of `spec` as an Example; `what` names the config field in errors."""
    from flminillm.data import Example

    out: list[Example] = []
    fmap: FieldMap | None = None
    name = ""
    for lineno, rec in read_records(spec.uri, store):
        if fmap is None:
            name, fmap = resolve_fields(spec.fields, rec)
        where = f"{spec.uri}:{lineno} ({what}, fields {name}: {fmap.model_dump()})"
        parts = []
        for key in fmap.prompt:
            value = rec.get(key)
            if value is None and key == fmap.prompt[0]:
                raise ValueError(f"{where}: no field {key!r}; the record has {sorted(rec)}")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: field {key!r} must be a string")
            if value and value.strip():
                parts.append(value)
        prompt = "\n".join(parts)
        if not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty")
        answer = ""
        if need_response:
            if fmap.response is None:
                raise ValueError(f"{where}: this set needs responses; map `response:` to a field")
            answer = rec.get(fmap.response)
            if not isinstance(answer, str):
                raise ValueError(f"{where}: no string field {fmap.response!r} (the response); "
                                 f"the record has {sorted(rec)}")  # fmt: skip
        category = rec.get(fmap.category) if fmap.category else None
        if category is not None and not isinstance(category, str):
            raise ValueError(f"{where}: the category field {fmap.category!r} must be a string")
        out.append(Example(family=category or DEFAULT_CATEGORY, prompt=prompt, answer=answer))
    if not out:
        raise ValueError(f"{spec.uri} ({what}): the data set is empty; it needs at least one "
                         "JSON object per line")  # fmt: skip
    return out


def load_texts_from(spec: DataFile, store: StoreConfig | None = None) -> list[str]:
    """A pre-training corpus: the prompt text of every record (fields: text)."""
    return [e.prompt for e in load_examples_from(spec, store, need_response=False,
                                                  what="data.pretrain")]  # fmt: skip


def categories(examples: list[Example]) -> list[str]:
    """Distinct categories in order of first appearance."""
    return list(dict.fromkeys(e.family for e in examples))


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    from flminillm.store import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def export_benchmark(cfg, out: str | Path) -> dict:
    """The benchmark `cfg` generates, as files (prompt/response/category JSONL) under `out`,
    and the config that reads them: {"files": {...}, "config": <dict for YAML>}."""
    from flminillm.data import generate_benchmark

    out = Path(out)
    fbc = cfg.families_by_client()
    bench, corpus = generate_benchmark(cfg)

    def rows(examples, response=True):
        return [{"prompt": e.prompt, **({"response": e.answer} if response else {}),
                 "category": e.family} for e in examples]  # fmt: skip

    files = {
        "public": _write_jsonl(out / "public.jsonl", rows(bench.public_prompts, False)),
        "eval": _write_jsonl(out / "eval.jsonl",
                             rows([e for v in bench.eval_sets.values() for e in v])),
        "pretrain": _write_jsonl(out / "pretrain.jsonl",
                                 [{"text": t} for t in corpus]),
    }  # fmt: skip
    if bench.val_sets:
        files["validation"] = _write_jsonl(
            out / "validation.jsonl", rows([e for v in bench.val_sets.values() for e in v])
        )
    for c in fbc:
        files[f"{c}.train"] = _write_jsonl(out / c / "train.jsonl", rows(bench.client_train[c]))
        files[f"{c}.test"] = _write_jsonl(out / c / "test.jsonl", rows(bench.client_test[c]))
    conf = json.loads(cfg.model_dump_json(exclude_defaults=True))
    conf["data"] = {
        "source": "files",
        "public": {"uri": files["public"], "fields": "prompt_response"},
        "eval": {"uri": files["eval"], "fields": "prompt_response"},
        "pretrain": {"uri": files["pretrain"], "fields": "text"},
        **({"validation": {"uri": files["validation"], "fields": "prompt_response"}}
           if "validation" in files else {}),
        **({"evaluate_on": cfg.data.evaluate_on} if cfg.data.evaluate_on != "eval" else {}),
    }  # fmt: skip
    for client in conf["clients"]:
        client.pop("families", None)
        client["data"] = {
            "train": {"uri": files[f"{client['id']}.train"], "fields": "prompt_response"},
            "test": {"uri": files[f"{client['id']}.test"], "fields": "prompt_response"},
        }
    return {"files": files, "config": conf}
