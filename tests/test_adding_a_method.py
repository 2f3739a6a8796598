"""A new method is one class and one YAML: the README's example, in-tree and out of tree.

The class and the YAML are taken verbatim from README.md ("Adding a method"), written to a
temporary folder (never into the repository) and reached by ``_target_``.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from kvq.results import read_result

from .conftest import CONF_DIR, REPO_ROOT, TINY, train_eval_cli

SECTION = "## Adding a method"


def _readme_blocks() -> tuple[str, str]:
    """The python and the yaml code block of the README's "Adding a method" section."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (conf,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return code, conf


def _without_schema(conf: str) -> str:
    """The YAML without its ``defaults:`` list (what a YAML outside conf/ looks like)."""
    lines = conf.splitlines()
    out, skipping = [], False
    for line in lines:
        if line.startswith("defaults:"):
            skipping = True
            continue
        if skipping and line.startswith("  - "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path/my_methods.py`` from the README, importable."""
    code, _ = _readme_blocks()
    (tmp_path / "my_methods.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_methods", None)
    return tmp_path


def test_in_tree_option_is_discovered_with_its_schema(example: Path, tmp_path: Path) -> None:
    """conf/method/clipped.yaml next to the shipped options: the schema comes from the class."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate
    from omegaconf.errors import ConfigKeyError

    from kvq import config
    from kvq.run import run

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    _, yaml_text = _readme_blocks()
    (conf / "method" / "clipped.yaml").write_text(yaml_text)
    found = config.discover(conf)
    (cls,) = [c for c in found["method"] if c.__name__ == "ClippedUniform"]
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema/method", name=cls.__name__, node=config.schema(cls))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=[*TINY, "method=clipped", "bits=b3", "granularity=head"])
            with pytest.raises((ConfigCompositionException, ConfigKeyError)):
                compose("config", overrides=["method=clipped", "method.clipp=2"])  # typo
            with pytest.raises(ConfigCompositionException):
                compose("config", overrides=["method=clipped", "method.clip=wide"])  # wrong type
    finally:
        GlobalHydra.instance().clear()
    q = instantiate(cfg.method)
    assert type(q) is cls and q.clip == 3.0 and q.name == "clipped"
    ppl = run(cfg, out_dir=tmp_path / "run")
    rec = read_result(tmp_path / "run")
    assert rec["status"] == "ok" and math.isfinite(ppl)
    # tiny model: 16-feature heads, one group of 3-bit codes + two fp16 values (lo, step) per 16
    assert rec["metrics"]["kv/bits_per_element"] == pytest.approx(3 + 32 / 16)
    assert rec["metrics"]["test/delta_ppl_pct"] != 0.0  # it really quantized


@pytest.mark.slow
def test_out_of_tree_method_through_train_eval(example: Path, tmp_path: Path) -> None:
    """The class in a module outside the package, its YAML outside conf/ (hydra.searchpath)."""
    _, yaml_text = _readme_blocks()
    extra = tmp_path / "extra_conf"
    (extra / "method").mkdir(parents=True)
    (extra / "method" / "clipped.yaml").write_text(_without_schema(yaml_text))
    env = {"PYTHONPATH": str(example)}
    common = [*TINY, f"hydra.searchpath=[file://{extra}]", "method=clipped", "bits=b3"]
    out = train_eval_cli([*common, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env_extra=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = read_result(tmp_path / "run")
    assert rec["status"] == "ok", rec["reason"]
    assert rec["config"]["method"]["_target_"] == "my_methods.ClippedUniform"
    assert rec["config"]["method"]["clip"] == 3.0 and rec["choices"]["method"] == "clipped"
    # a key the class does not have: malformed (exit 2, one line naming the fields), not skipped
    bad = train_eval_cli(
        [*common, "+method.clipp=2", f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path, env_extra=env
    )
    assert bad.returncode == 2, (bad.returncode, bad.stderr[-2000:])
    assert "unknown key method.clipp" in bad.stderr and "clip" in bad.stderr
    assert "Traceback" not in bad.stderr
