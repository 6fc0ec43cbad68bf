"""The experiment harness: one flag vocabulary, provenance, settings recorded from the objects."""

import dataclasses
import pathlib
import subprocess

import optax
import pytest

import bilevel_jax as bj
from experiments import harness


def _cli(**kw):
    args = {
        "quick": "short run",
        "seeds": "which seeds",
        "base_steps": "optimizer steps of θ",
        "meta_steps": "updates of λ",
    }
    args.update(kw)
    return harness.StudyCLI("toy_study", "A toy study.\n\nMore text.", **args)


def test_default_json_path_and_its_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path / "results")
    args = _cli().parse(["--quick"])
    path = pathlib.Path(args.json)
    assert path == tmp_path / "results" / "quick" / "toy_study.json"
    # a fresh clone has no (git-ignored) quick/ folder: parse creates it, since the per-step
    # logs are opened there before the run finishes
    assert path.parent.is_dir()
    assert _cli().parse([]).json == str(tmp_path / "results" / "toy_study.json")


def test_unused_flags_are_rejected_with_their_reason(capsys):
    cli = _cli(meta_steps=harness.Unused("the search length is set in epochs"))
    with pytest.raises(SystemExit) as e:
        cli.parse(["--meta-steps", "3"])
    assert e.value.code == 2
    assert "--meta-steps is not used by this study: the search length is set in epochs" in (
        capsys.readouterr().err
    )
    assert cli.parse(["--base-steps", "5"]).base_steps == 5


@pytest.mark.parametrize("old, new", [("--steps", "--base-steps"), ("--seed", "--seeds")])
def test_retired_flags_name_their_replacement(old, new, capsys):
    with pytest.raises(SystemExit):
        _cli().parse([old, "3"])
    assert new in capsys.readouterr().err


def test_steps_flags_fix_each_other_and_must_agree(capsys):
    cli = _cli()
    assert cli.steps(cli.parse([]), per_meta=10, default=300, quick=6) == (3000, 300)
    assert cli.steps(cli.parse(["--quick"]), per_meta=10, default=300, quick=6) == (60, 6)
    assert cli.steps(cli.parse(["--meta-steps", "7"]), per_meta=10, default=300, quick=6) == (
        70,
        7,
    )
    assert cli.steps(
        cli.parse(["--base-steps", "250"]), per_meta=10, default=1, quick=1, warmup=50
    ) == (
        250,
        20,
    )
    with pytest.raises(SystemExit):
        cli.steps(cli.parse(["--base-steps", "75"]), per_meta=10, default=1, quick=1)
    assert "10 base steps per meta step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.steps(
            cli.parse(["--base-steps", "70", "--meta-steps", "6"]), per_meta=10, default=1, quick=1
        )
    assert "disagree" in capsys.readouterr().err


def test_seeds():
    cli = _cli()
    assert cli.seeds(cli.parse([])) == [0, 1, 2]
    assert cli.seeds(cli.parse(["--quick"])) == [0]
    assert cli.seeds(cli.parse(["--seeds", "4", "5"])) == [4, 5]


def test_provenance_records_the_checkout():
    prov = harness.provenance(["--quick"], "toy_study", device=False)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=harness.ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert prov["git_commit"] == head
    assert isinstance(prov["git_dirty"], bool) and isinstance(prov["library_dirty"], bool)
    assert prov["command"] == "python -m experiments.toy_study --quick"
    assert prov["packages"]["optax"] == optax.__version__
    assert "device" not in prov and prov["data_files"] == []


def test_data_with_per_file_digests_prints_one_line(capsys):
    run = harness.Run.__new__(harness.Run)  # only the provenance is needed for data()
    run.provenance = {"data_files": []}
    src = {"name": "text", "sha256": {"a.txt": "1" * 64, "b.txt": "2" * 64}}
    run.data(src)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "of 2 files' sha256" in out and "1111" not in out
    assert run.provenance["data_files"] == [src]  # every digest is still recorded


def test_git_dirty_ignores_results_of_earlier_studies(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setattr(harness, "ROOT", tmp_path)
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "results" / "a.json").write_text("{}")
    assert harness.provenance([], "toy", device=False)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert harness.provenance([], "toy", device=False)["git_dirty"] is True


def test_to_json_records_settings_from_the_objects():
    tx = harness.Recipe(optax.adam, 1e-3, eps_root=1e-8)
    out = harness.to_json({"method": bj.cg(7), "tx": tx, "steps": (1, 2)})
    assert out["method"] == repr(bj.cg(7))
    assert "maxiter=7" in out["method"] and " at 0x" not in out["method"]
    assert out["tx"] == "optax.adam(0.001, eps_root=1e-08)"
    assert out["steps"] == [1, 2]
    assert isinstance(tx(), optax.GradientTransformation)  # the recipe builds what it prints


def test_a_recipe_of_recipes_builds_the_chain_it_prints():
    import jax.numpy as jnp

    tx = harness.Recipe(
        optax.chain,
        harness.Recipe(optax.add_decayed_weights, 0.1),
        harness.Recipe(optax.sgd, 0.5, momentum=0.9),
    )
    assert repr(tx) == "optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))"
    built = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.5, momentum=0.9))
    p, g = jnp.array([1.0, -2.0]), jnp.array([0.3, 0.4])
    got, _ = tx().update(g, tx().init(p), p)
    want, _ = built.update(g, built.init(p), p)
    got, want = jnp.asarray(got), jnp.asarray(want)
    assert jnp.array_equal(got, want)  # -0.5 * (g + 0.1 p): decay before the step
    assert jnp.allclose(got, -0.5 * (g + 0.1 * p))


def test_to_json_expands_the_studies_configs_only():
    from experiments.noisy_labels_demo import Config

    cfg = Config()
    out = harness.to_json(cfg)
    assert set(out) == {f.name for f in dataclasses.fields(cfg)}

    @dataclasses.dataclass
    class Foreign:  # not a study's: recorded by its repr
        x: int = 1

    assert harness.to_json(Foreign()) == repr(Foreign())
