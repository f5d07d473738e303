"""`nanoseek info`: the figures of SPEC §1 from a meta-device model, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from nanoseek.cli import main


def test_info_json_matches_spec_for_deepseek_v3(capsys):
    assert main(["info", "--preset", "deepseek-v3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 671_026_404_352
    assert round(info["mtp_params"] / 1e9, 2) == 11.61
    assert round(info["activated_params"] / 1e9, 2) == 37.55
    assert round(info["activated_params_without_embedding"] / 1e9, 2) == 36.63
    assert info["kv_cache_elements_per_token"] == (512 + 64) * 61 == 35_136
    assert info["mha_cache_elements_per_token"] == 2 * 128 * 128 * 61
    assert info["transformers_cache_elements_per_token"] == 128 * (192 + 128) * 61


def test_r1_is_v3(capsys):
    main(["info", "--preset", "deepseek-r1", "--json"])
    r1 = json.loads(capsys.readouterr().out)
    main(["info", "--preset", "deepseek-v3", "--json"])
    v3 = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in r1.items() if k != "model"} == {k: v for k, v in v3.items() if k != "model"}


def test_info_v2_presets_match_published_sizes(capsys):
    main(["info", "--preset", "deepseek-v2", "--json"])
    v2 = json.loads(capsys.readouterr().out)
    assert round(v2["total_params"] / 1e9) == 236 and round(v2["activated_params"] / 1e9) == 21
    main(["info", "--preset", "deepseek-v2-lite", "--json"])
    lite = json.loads(capsys.readouterr().out)
    assert round(lite["total_params"] / 1e9, 1) == 15.7
    assert abs(lite["activated_params_without_embedding"] / 1e9 - 2.4) < 0.1  # published: 2.4B


def test_info_text_and_checkpoint(tmp_path, capsys):
    from nanoseek import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("deepseek-v3").to_hf()))
    assert main(["info", "--checkpoint", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "671,026,404,352" in text and "35,136" in text


@pytest.mark.parametrize("args, message", [
    (["info", "--checkpoint", "/no/such/dir"], "no config.json"),
    (["info", "--checkpoint", "BAD"], "config.json"),
])
def test_info_bad_input_is_one_line(tmp_path, capsys, args, message):
    if args[-1] == "BAD":
        (tmp_path / "config.json").write_text("{not json")
        args = ["info", "--checkpoint", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_info_names_the_checkpoint_of_a_bad_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "x"}))
    assert main(["info", "--checkpoint", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"nanoseek info: error: {tmp_path}: ")


def info_of(checkpoint, capsys) -> tuple[str, dict]:
    """`nanoseek info --checkpoint`'s text and JSON."""
    assert main(["info", "--checkpoint", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert main(["info", "--checkpoint", str(checkpoint), "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)


def test_info_says_a_transformers_checkpoint_holds_no_mtp_weights(tmp_path, capsys):
    """transformers saves num_nextn_predict_layers = 1 in config.json but drops the MTP layer's weights."""
    transformers = pytest.importorskip("transformers")
    from nanoseek import ModelConfig

    config = ModelConfig.preset("tiny")
    transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**config.to_hf())).save_pretrained(tmp_path)
    text, info = info_of(tmp_path, capsys)
    assert ("1 MTP module(s) in config.json, none in the weights (transformers drops them): "
            "speculative decoding unavailable") in text
    assert "not in the weights)" in text.splitlines()[2]  # the MTP parameter count
    assert info["mtp_modules_in_weights"] == 0 and info["config"]["num_nextn_predict_layers"] == 1


@pytest.mark.parametrize("max_shard_bytes", [4 << 30, 64 * 1024])  # model.safetensors, an index and shards
def test_info_on_a_checkpoint_with_its_mtp_weights_is_unchanged(tmp_path, capsys, max_shard_bytes):
    from nanoseek import DeepSeekV3, ModelConfig
    from nanoseek.hf import save_pretrained

    save_pretrained(DeepSeekV3(ModelConfig.preset("tiny")), tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)
    text, info = info_of(tmp_path / "ckpt", capsys)
    assert text.splitlines()[0].endswith(", 1 MTP module(s)") and "weights" not in text
    assert info["mtp_modules_in_weights"] == 1


def test_info_on_a_checkpoint_without_weight_files_says_so(tmp_path, capsys):
    from nanoseek import ModelConfig

    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
    text, info = info_of(tmp_path, capsys)
    assert text.splitlines()[0].endswith(", 1 MTP module(s)")
    assert text.splitlines()[1] == (f"  {tmp_path} holds no weight files (model.safetensors or "
                                    "model.safetensors.index.json): the figures below are config.json's, MTP included")
    assert info["mtp_modules_in_weights"] is None
    main(["info", "--preset", "tiny", "--json"])
    assert "mtp_modules_in_weights" not in json.loads(capsys.readouterr().out)  # a preset has no weights


def test_version_and_a_subcommands_unknown_flag(capsys):
    from nanoseek import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"nanoseek {__version__}"
    with pytest.raises(SystemExit) as done:
        main(["train", "--bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and err[0].startswith("usage: nanoseek train")  # the subcommand's usage
    assert err[-1] == "nanoseek train: error: unrecognized arguments: --bogus"


def test_demo_checks_its_own_options_first(capsys):
    assert main(["demo", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "nanoseek demo: error: --max-new-tokens must be a positive integer, got 0"


def test_demo_help_shows_the_demos_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines re-wrapped
    assert "optimizer steps (default 760, lowered to fit" in text
    assert "bias update speed (default 0.01)" in text and "(default 8.5)" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (default 360)" in text and "bias update speed (default 0.001)" in text


def test_console_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--preset", "tiny", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["kv_cache_elements_per_token"] == (32 + 16) * 3
    bad = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--preset", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


INTERRUPTED_IMPORT = """
import os, signal, sys

# as at a terminal: a shell without job control (CI scripts, `cmd &`) starts background jobs with SIGINT
# ignored, and Python keeps an ignored SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)

class CtrlC:  # Ctrl-C while a module is imported
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlC())
sys.argv = ["nanoseek", "info", "--preset", "tiny"]
{entry}
"""


@pytest.mark.parametrize("entry", [
    "from nanoseek.cli import main; sys.exit(main())",  # the console script
    "import runpy; runpy.run_module('nanoseek', run_name='__main__', alter_sys=True)",  # python -m nanoseek
])
@pytest.mark.parametrize("module", ["nanoseek.config", "torch", "nanoseek.train.cli"])  # all in main, torch seconds
def test_ctrl_c_while_importing_is_one_line(entry, module):
    """torch and the feature modules take seconds to import, before the command runs: a Ctrl-C then is no
    stack trace either."""
    code = INTERRUPTED_IMPORT.format(module=module, entry=entry)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and result.stderr == "\nnanoseek: interrupted\n", result.stderr
    assert result.stdout == ""


def test_import_nanoseek_is_light_and_its_names_and_subpackages_load_on_use():
    """``import nanoseek`` does not import torch (so the command can catch a Ctrl-C while it loads), and its
    exported names and subpackages (``nanoseek.model``, ``nanoseek.hf``) still load on first use."""
    code = ("import sys, nanoseek; assert 'torch' not in sys.modules; "
            "from nanoseek.model.transformer import DeepSeekV3; "
            "assert nanoseek.DeepSeekV3 is nanoseek.model.DeepSeekV3 is DeepSeekV3; "
            "assert callable(nanoseek.hf.load_pretrained) and callable(nanoseek.generate); "
            "assert 'ModelConfig' in dir(nanoseek); "
            "import pytest; pytest.raises(AttributeError, lambda: nanoseek.no_such_name); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_train_switches_can_be_turned_off_for_a_resumed_run():
    """A run keeps the switches it started with (--compile, --no-report, a time budget) unless the resume names
    them: each has a --no- form, and --time-budget 0 removes the budget."""
    from nanoseek.cli import build_parser
    from nanoseek.train.cli import given_settings

    args = build_parser().parse_args(["train", "--resume", "runs/x", "--no-compile", "--report", "--progress",
                                      "--no-activation-checkpointing", "--time-budget", "0"])
    assert given_settings(args) == {"compile": False, "report": True, "progress": True,
                                    "activation_checkpointing": False, "time_budget": None}
    assert given_settings(build_parser().parse_args(["train", "--compile", "--no-report"])) == {
        "compile": True, "report": False}


def test_a_relative_cache_dir_is_stored_absolute(tmp_path, monkeypatch):
    from nanoseek.cli import build_parser
    from nanoseek.train.cli import given_settings

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["train", "--cache-dir", "cache"])
    assert given_settings(args) == {"cache_dir": str(tmp_path / "cache")}
