"""Tests for experiment configuration loading and validation (flminillm.config)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flminillm.config import LATE_OPTIONS, ConfigError, ExperimentConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

ROOT = Path(__file__).resolve().parents[1]


def _tiny() -> dict:
    return yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml")
    text = str(err.value)
    assert text.startswith("invalid config test.yaml")
    return text


def _locations(text: str) -> list[str]:
    """The field path of each reported problem (`  - <path>: <message>`)."""
    return re.findall(r"^  - ([^:]+):", text, flags=re.M)


def test_repo_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_repo_configs_load(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert len(cfg.clients) >= 1
    assert Path(cfg.store.uri).is_absolute()
    if cfg.data.source == "files":  # every client reads a training file that exists
        assert all(Path(c.data.train.uri).is_file() for c in cfg.clients)
        assert cfg.families_by_client() == {}  # known once prepare has read the files
    else:
        fbc = cfg.families_by_client()
        assert set(fbc) == {c.id for c in cfg.clients}
        held = [f for fams in fbc.values() for f in fams]
        assert len(held) == len(set(held))  # disjoint
        assert set(held) == set(cfg.data.families)  # covering
        assert all(fams for fams in fbc.values())  # every client holds something
    # the digest is a stable function of the content
    assert cfg.digest() == load_config(path).digest()


def test_auto_partition_is_disjoint_and_covering():
    data = _tiny()
    data["clients"].append({"id": "carol"})
    data["data"]["families"] = ["successor", "repeat", "first_letter", "compare", "currency"]
    cfg = parse_config(data)
    assert all(c.families is None for c in cfg.clients)
    fbc = cfg.families_by_client()
    assert list(fbc) == ["alice", "bob", "carol"]
    held = sorted(f for fams in fbc.values() for f in fams)
    assert held == sorted(data["data"]["families"])
    assert sorted(len(v) for v in fbc.values()) == [1, 2, 2]
    assert fbc == parse_config(data).families_by_client()  # deterministic


def test_explicit_families_are_kept():
    data = _tiny()
    data["clients"][0]["families"] = ["repeat", "successor"]
    data["clients"][1]["families"] = ["first_letter"]
    cfg = parse_config(data)
    assert cfg.families_by_client() == {
        "alice": ["repeat", "successor"],
        "bob": ["first_letter"],
    }


def test_unknown_key_names_its_path():
    data = _tiny()
    data["clients"][0]["modle"] = {"family": "gpt2"}
    text = _error(data)
    assert _locations(text) == ["clients.0.modle"]
    assert "unknown key" in text


def test_unknown_top_level_key():
    data = _tiny()
    data["roundz"] = 3
    text = _error(data)
    assert _locations(text) == ["roundz"]
    assert "unknown key" in text


def test_several_problems_are_all_reported():
    data = _tiny()
    data["distill"]["alpha"] = 2
    data["generation"]["top_k"] = 0
    data["server"]["model"]["num_layerz"] = 2
    text = _error(data)
    assert sorted(_locations(text)) == [
        "distill.alpha",
        "generation.top_k",
        "server.model.num_layerz",
    ]
    assert "3 problem(s)" in text


@pytest.mark.parametrize(
    ("mutate", "path", "words"),
    [
        (
            lambda d: d["clients"][0]["model"].update(hidden_size=33, num_heads=2),
            "clients.0.model",
            ["hidden_size (33)", "num_heads (2)"],
        ),
        (lambda d: d["distill"].update(alpha=2), "distill.alpha", ["less than or equal to 1"]),
        (lambda d: d["distill"].update(alpha=-0.1), "distill.alpha", ["greater than"]),
        (
            lambda d: d["data"].update(families=["successor", "bogus", "repeat"]),
            "data.families",
            ["bogus", "allowed"],
        ),
        (
            lambda d: d["clients"][1]["model"].update(family="mamba"),
            "clients.1.model.family",
            ["gpt2", "mamba"],
        ),
        (lambda d: d["clients"][0].update(id="Alice"), "clients.0.id", ["pattern"]),
        (lambda d: d.pop("server"), "server", ["missing"]),
    ],
)
def test_bad_field_values_name_their_path(mutate, path, words):
    data = _tiny()
    mutate(data)
    text = _error(data)
    assert _locations(text) == [path]
    for w in words:
        assert w in text, (w, text)


def _duplicate_ids(d):
    d["clients"][1]["id"] = "alice"


def _client_named_like_server(d):
    d["clients"][1]["id"] = "server"


def _overlapping_families(d):
    d["clients"][0]["families"] = ["successor", "repeat"]
    d["clients"][1]["families"] = ["repeat", "first_letter"]


def _too_few_clients(d):
    d["sampling"]["min_clients"] = 3


def _families_for_some(d):
    d["clients"][0]["families"] = ["repeat"]


def _server_families(d):
    d["server"]["families"] = ["repeat"]


def _family_outside_data(d):
    d["clients"][0]["families"] = ["repeat"]
    d["clients"][1]["families"] = ["compare"]


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (_duplicate_ids, ["party ids must be unique", "alice"]),
        (_client_named_like_server, ["party ids must be unique", "server"]),
        (_overlapping_families, ["disjoint", "'repeat'"]),
        (_too_few_clients, ["sampling.min_clients: 3", "number of clients (2)"]),
        (_families_for_some, ["every client or for none"]),
        (_server_families, ["server.families"]),
        (_family_outside_data, ["not in data.families", "compare"]),
    ],
)
def test_cross_field_rules(mutate, words):
    data = _tiny()
    mutate(data)
    text = _error(data)
    assert len(_locations(text)) == 1
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("mutate", [_duplicate_ids, _overlapping_families])
def test_cross_field_errors_name_the_field_path(mutate):
    data = _tiny()
    mutate(data)
    locs = _locations(_error(data))
    assert len(locs) == 1
    assert locs[0].startswith("clients"), locs


def test_relative_paths_resolved_against_working_directory(tmp_path, monkeypatch):
    data = _tiny()
    data["store"] = {"uri": "here/store"}
    data["tracking"] = {"uri": "sqlite:///here/mlflow.db"}
    data["output_dir"] = "out"
    data["runner"] = {"pipeline_root": "kfp"}
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(cfg_path)
    base = work.resolve()
    assert cfg.store.uri == str(base / "here" / "store")
    assert cfg.tracking.uri == "sqlite:///" + str(base / "here" / "mlflow.db")
    assert cfg.tracking.uri.startswith("sqlite:////")
    assert cfg.output_dir == str(base / "out")
    assert cfg.runner.pipeline_root == str(base / "kfp")


def test_absolute_and_remote_paths_are_kept(tmp_path, monkeypatch):
    data = _tiny()
    data["store"] = {"uri": str(tmp_path / "abs-store")}
    data["tracking"] = {"uri": "http://mlflow:5000"}
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(REPO)
    cfg = load_config(cfg_path)
    assert cfg.store.uri == str(tmp_path / "abs-store")
    assert cfg.tracking.uri == "http://mlflow:5000"
    data["tracking"] = {"uri": "sqlite:////abs/mlflow.db"}
    cfg_path.write_text(yaml.safe_dump(data))
    assert load_config(cfg_path).tracking.uri == "sqlite:////abs/mlflow.db"


def test_load_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_config_is_frozen_and_digest_changes():
    cfg = parse_config(_tiny())
    with pytest.raises(ValidationError, match="frozen"):
        cfg.rounds = 5  # type: ignore[misc]
    other = copy.deepcopy(_tiny())
    other["rounds"] = 2
    assert parse_config(other).digest() != cfg.digest()
    assert parse_config(_tiny()).digest() == cfg.digest()


def test_the_contest_s_own_options_are_left_out_while_the_contest_is_off():
    """config.INERT_OPTIONS: with distill.contest_quantile 1 the contest's own options
    change nothing, so they are not hashed: a federation run with the contest off keeps its
    id whatever their values or defaults; on, they are hashed. A bar set with the contest
    off is an error that names the fix; the default bar is inert then."""
    import json

    off = copy.deepcopy(_tiny())
    off.setdefault("distill", {})["contest_quantile"] = 1.0
    plain = parse_config(off)
    for extra in ({"contest_bar_peers": "all"}, {"contest_leave_out": False},
                  {"contest_p": 0.2}, {"contest_bar": 0.0},
                  {"contest_bar_over": "judged"}, {"contest_min_judged": 5}):  # fmt: skip
        other = copy.deepcopy(off)
        other["distill"].update(extra)
        assert parse_config(other).digest() == plain.digest(), extra
    sent = json.loads(plain.experiment_json())["distill"]
    assert not {"contest_p", "contest_bar", "contest_bar_peers", "contest_leave_out"} & set(sent)
    on = copy.deepcopy(_tiny())
    on.setdefault("distill", {}).update(contest_quantile=0.75, contest_bar=0.05,
                                        contest_bar_peers="all", contest_leave_out=False)  # fmt: skip
    sent_on = json.loads(parse_config(on).experiment_json())["distill"]
    assert sent_on["contest_bar_peers"] == "all" and sent_on["contest_leave_out"] is False
    # a late option at its old value is left out (ids kept); at any other, its default since
    # stop 48 among them, it is hashed
    assert sent_on["contest_bar_over"] == "judged-veto"
    on["distill"]["contest_bar_over"] = "wins"
    assert "contest_bar_over" not in json.loads(parse_config(on).experiment_json())["distill"]
    # what a step receives parses again, the left-out options at their defaults
    from flminillm.config import experiment_from_json

    assert experiment_from_json(plain.experiment_json()).distill.contest_quantile == 1.0
    # the contest as a filter alone (no bar): whose contests would bar is inert
    filt = copy.deepcopy(_tiny())
    filt.setdefault("distill", {}).update(contest_quantile=0.75, contest_bar=0.0,
                                          contest_leave_out=True)  # fmt: skip
    two = copy.deepcopy(filt)
    two["distill"]["contest_bar_peers"] = "two"
    assert parse_config(two).digest() == parse_config(filt).digest()
    bad = copy.deepcopy(off)
    bad["distill"]["contest_bar"] = 0.05
    with pytest.raises(ConfigError, match="contest_bar 0.05 reads the peer contest"):
        parse_config(bad)


def test_a_step_runs_the_pinned_old_value_of_a_late_option_not_the_new_default():
    """A step parses the experiment JSON, which leaves out a late option at its old value
    (the id kept); parsing restores that value (`restore_late_options`), so a config that
    pins it (the as-measured configs, the `-undefended` variants) runs its steps with it,
    not with a default changed since (tie_rank 'low', the contest on: stops 38 and 40).
    Every config in configs/ and UNDEFENDED round-trip to the same settings, but for the
    contest's own options while the contest is off (inert, INERT_OPTIONS)."""
    from flminillm.bench.variants import UNDEFENDED
    from flminillm.config import INERT_OPTIONS, deep_merge, experiment_from_json

    bench = load_config(ROOT / "configs" / "benchmark.yaml")
    cfgs = [load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    cfgs.append(parse_config(deep_merge(bench.model_dump(mode="json"), UNDEFENDED)))
    pinned = 0
    for cfg in cfgs:
        sent = experiment_from_json(cfg.experiment_json())
        assert sent.model_dump(exclude={"distill"}) == cfg.experiment.model_dump(
            exclude={"distill"}
        )
        for name in type(cfg.distill).model_fields:
            rules = INERT_OPTIONS["distill"].items()
            if any(getattr(cfg.distill, k) == v and name in o for (k, v), o in rules):
                continue
            assert getattr(sent.distill, name) == getattr(cfg.distill, name), (cfg.name, name)
        pinned += cfg.distill.tie_rank == "mean"
    assert pinned >= 6  # five as-measured configs and UNDEFENDED pin an old value


def test_a_late_option_at_its_default_keeps_the_federation_id():
    """An option added after federations had run (config.LATE_OPTIONS) is left out of the
    hashed experiment while at the value that behaves as before, so existing federation
    ids and cached steps stay valid; set to anything else, it is hashed and sent. A new
    default that computes differently (plausibility_margin: on by default) is hashed at
    it, so the federations it changes get new ids."""
    import json

    from flminillm.config import LATE_OPTIONS

    cfg = parse_config(_tiny())
    sent = json.loads(cfg.experiment_json())
    for section, fields in LATE_OPTIONS.items():
        model = type(getattr(cfg, section))
        for name, old in fields.items():
            default = model.model_fields[name].default
            if default == old:
                assert name not in sent[section]
            else:
                assert sent[section][name] == default
            before = copy.deepcopy(_tiny())
            # the bar off with the contest on needs the contest's filter (or nothing is done)
            with_it = {"contest_bar": {"contest_leave_out": True}}.get(name, {})
            before.setdefault(section, {}).update({name: old, **with_it})
            assert name not in json.loads(parse_config(before).experiment_json())[section]
    assert sent["distill"]["plausibility_margin"] == 1.0
    explicit = copy.deepcopy(_tiny())
    explicit.setdefault("distill", {})["lr_schedule"] = "constant"
    assert parse_config(explicit).digest() == cfg.digest()
    explicit["distill"]["lr_schedule"] = "cosine"
    cosine = parse_config(explicit)
    assert cosine.digest() != cfg.digest()
    assert json.loads(cosine.experiment_json())["distill"]["lr_schedule"] == "cosine"
    # what a step receives parses back to the same settings
    assert ExperimentConfig.model_validate(sent) == cfg.experiment


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    """A config can start from another (`extends`, relative to its own file): mappings merge
    key by key, lists and values are replaced; a missing parent or a loop is named."""
    from flminillm.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    five = load_config(root / "configs" / "benchmark-5clients.yaml")
    bench = load_config(root / "configs" / "benchmark.yaml")
    assert [c.id for c in five.clients] == ["alice", "bob", "carol", "dave", "erin"]
    assert five.sampling.fraction == 0.8 and five.sampling.min_clients == bench.sampling.min_clients
    assert five.distill == bench.distill and five.pretrain == bench.pretrain
    assert five.data.n_public_per_family == 384
    assert five.data.n_train_per_family == bench.data.n_train_per_family
    large = load_config(root / "configs" / "benchmark-large-server.yaml")
    assert large.server.id == bench.server.id and large.server.model.hidden_size == 256
    longer = load_config(root / "configs" / "benchmark-10rounds.yaml")
    # ten rounds, the server's last round's model, no plausibility check and rank alone, the
    # teachers at temperature 1, as when its docs were measured
    plain = bench.experiment_dict()
    assert longer.rounds == 10 and longer.experiment_dict() == {
        **plain,
        "rounds": 10,
        "name": "benchmark-10rounds",
        "generation": {**plain["generation"], "temperature": 1.0},
        "distill": {
            k: v
            for k, v in plain["distill"].items()
            if k not in LATE_OPTIONS["distill"]  # every late option at its "off", as measured
        },
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../nowhere.yaml\nname: x\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml \(extended by"):
        load_config(tmp_path / "sub" / "child.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_a_claim_sum_limit_below_one_is_refused_with_the_fix():
    """distill.max_claim_sum: 0 (off) or at least 1; a limit below 1 would bar honest
    teachers, whose claims on one prompt may sum to 1, and the error says so."""
    from flminillm.config import DistillConfig

    assert DistillConfig().max_claim_sum == 1.5
    assert DistillConfig(max_claim_sum=0).max_claim_sum == 0
    assert DistillConfig(max_claim_sum=1).max_claim_sum == 1
    with pytest.raises(ValidationError, match=r"max_claim_sum 0.8.*bars honest teachers.*or 0"):
        DistillConfig(max_claim_sum=0.8)
    assert DistillConfig().max_prompt_claim_sum == 1.5
    with pytest.raises(ValidationError, match=r"max_prompt_claim_sum 0.5.*round's prompts.*or 0"):
        DistillConfig(max_prompt_claim_sum=0.5)


def test_contest_min_judged_needs_a_judged_share_and_keeps_ids_at_its_default():
    """`distill.contest_min_judged` counts the wins a peer judged: under 'wins' it is an
    error that names the field and the fix; at 0 (one judged win is enough, as before) it is
    left out of the experiment, so every federation run before it keeps its id; set, it is
    hashed."""
    import json

    from flminillm.config import DistillConfig

    with pytest.raises(ValidationError, match="contest_min_judged 5 .*contest_bar_over"):
        DistillConfig(contest_bar_over="wins", contest_min_judged=5)
    assert DistillConfig().contest_min_judged == 0
    raw = copy.deepcopy(_tiny())
    raw.setdefault("distill", {}).update(contest_quantile=0.75, contest_bar=0.25)
    assert "contest_min_judged" not in json.loads(parse_config(raw).experiment_json())["distill"]
    raw["distill"]["contest_min_judged"] = 5
    assert json.loads(parse_config(raw).experiment_json())["distill"]["contest_min_judged"] == 5
    # inert with the bar off: left out, the id that of the same federation without it
    raw["distill"]["contest_bar"] = 0.0
    raw["distill"]["contest_leave_out"] = True
    without = copy.deepcopy(raw)
    del without["distill"]["contest_min_judged"]
    assert parse_config(raw).digest() == parse_config(without).digest()
