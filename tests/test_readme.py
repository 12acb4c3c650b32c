"""The README documents every params.yaml key and every model: docs that cannot drift."""

from __future__ import annotations

import yaml

from stl.config import describe_keys, load_config
from stl.models import list_models
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_every_params_key_is_documented_and_params_yaml_has_exactly_the_config_keys() -> None:
    keys = [k for k, _, _ in describe_keys()]
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README lacks params keys: {missing}"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key in keys:  # the table shows the committed value of every scalar key
        value = params
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, list):
            assert f"| `{key}` | `{value if value != '' else chr(39) * 2}` |" in README, key

    def flat(d: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
        return out

    assert sorted(flat(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))) == sorted(keys)
    load_config(REPO_ROOT / "params.yaml")  # the committed params are valid


def test_every_model_and_alias_is_in_the_readme_table() -> None:
    for row in list_models():
        assert f"`{row['name']}`" in README and f"`{row['alias']}`" in README, row


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command() -> None:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].rstrip().endswith("dvc repro           # the pipeline")
    test_cmd = block[1].split("#")[0].strip()
    assert "pip install -e \".[dev]\"" in test_cmd and test_cmd.endswith("python -m pytest")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e \".[dev]\"" in ci and "python -m pytest" in ci
