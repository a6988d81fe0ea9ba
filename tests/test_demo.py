"""The demo's claim, end to end (slow: about 6 minutes on 2 cores; `make test-slow`)."""

import json

import pytest
import yaml

from flminillm.cli import main


@pytest.mark.slow
def test_demo_transfers_skills_between_parties(tmp_path):
    from tests.conftest import ROOT

    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["store"] = {"uri": str(tmp_path / "store")}
    data["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    data["runner"]["pipeline_root"] = str(tmp_path / "kfp")
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(config)]) == 0
    parties = json.loads((tmp_path / "out" / "results.json").read_text())["parties"]
    server = parties.pop("server")
    # the server never saw private data, yet beats its start on every family
    for fam, after in server["after"].items():
        assert after["exact_match"] > server["before"][fam]["exact_match"], fam
    # every client gains on at least one family it never held
    for cid, r in parties.items():
        gains = [
            r["after"][f]["exact_match"] - r["before"][f]["exact_match"]
            for f in r["after"]
            if f not in r["held"]
        ]
        assert max(gains) > 0, (cid, gains)
