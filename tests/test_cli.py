import os
import shutil
import subprocess
import sys

import torch

from oaq_search.cli import main
from oaq_search.models import build_model


def one_line_error(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("oaq-search: error: ") and err.count("\n") == 1, err
    assert pattern in err, err


def test_unknown_model(capsys):
    one_line_error(capsys, ["graph", "--model", "resnet21"], "unknown model 'resnet21'")


def test_missing_data_root(capsys, tmp_path):
    one_line_error(capsys, ["eval", "--model", "resnet20", "--data-root", str(tmp_path / "none")], "CIFAR-10 not found")


def test_corrupt_checkpoint(capsys, tmp_path, synthetic_cifar):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02garbage")
    one_line_error(capsys, ["eval", "--model", "resnet20", "--checkpoint", str(tmp_path / "bad.pt"),
                            "--data-root", str(synthetic_cifar)], "bad.pt")


def test_malformed_study_file(capsys, tmp_path):
    (tmp_path / "s.toml").write_text('name = "x"\n[model]\nname = "resnet20"\n[search]\nweight_bitz = [2]\n')
    one_line_error(capsys, ["run", str(tmp_path / "s.toml")], "unknown key 'search.weight_bitz'")


def test_eval_and_graph_print_results(capsys, tmp_path, synthetic_cifar):
    torch.save(build_model("resnet20").state_dict(), tmp_path / "r20.pt")
    assert main(["eval", "--model", "resnet20", "--checkpoint", str(tmp_path / "r20.pt"),
                 "--data-root", str(synthetic_cifar), "--search-size", "50"]) == 0
    assert "on 30 test images" in capsys.readouterr().out
    assert main(["graph", "--model", "resnet20"]) == 0
    assert "20 quantizable layers, 268336 weights" in capsys.readouterr().out


def test_console_script_is_installed_and_exits_non_zero_on_bad_input():
    executable = shutil.which("oaq-search")
    assert executable, "oaq-search is not on PATH: install the package with pip install -e ."
    result = subprocess.run([executable, "graph", "--model", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("oaq-search: error: unknown model")


def test_output_into_a_closed_pipe_stops_quietly():
    """`oaq-search graph | head`: the reader is gone before the output ends; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `head` has exited
    result = subprocess.run([sys.executable, "-m", "oaq_search", "graph", "--model", "resnet20"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    assert result.returncode == 1 and result.stderr == ""


def test_help_and_argument_errors_import_neither_torch_nor_optuna():
    """What keeps `oaq-search --help` instant (timed in benchmarks/cli_startup.py): parsing loads nothing heavy."""
    probe = ("import sys\nfrom oaq_search.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted({'torch', 'optuna', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out
