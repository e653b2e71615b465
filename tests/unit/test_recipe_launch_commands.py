"""The launch commands a recipe turns into: torchrun per node, the printed multi-node plan, the sbatch script."""

import subprocess

from archopt_plugins.cli import main
from archopt_plugins.recipe.launch import node_commands, slurm_script, torchrun_args
from archopt_plugins.recipe.validate import validate_data
from recipe_fixtures import ROOT, tiny, write_recipe


def test_single_node_uses_standalone_rendezvous_with_elastic_restarts():
    recipe = validate_data(tiny(**{"backend.kind": "ddp", "launch.nproc_per_node": 2, "launch.max_restarts": 3,
                                   "batch.micro_batch_size": 2}))
    args = torchrun_args(recipe)
    assert args[1:3] == ["-m", "torch.distributed.run"]
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=3"} <= set(args)


def test_multi_node_commands_share_one_rendezvous_and_node_zero_hosts_it(tmp_path):
    recipe = validate_data(tiny(**{"backend.kind": "ddp", "launch.nodes": 3, "launch.rdzv_endpoint": "head:29400",
                                   "launch.rdzv_id": "job7", "batch.micro_batch_size": 1, "batch.global_batch_size": 3}))
    commands = node_commands(recipe, tmp_path / "recipe.yaml", tmp_path, resume=True)
    assert len(commands) == 3
    for k, command in enumerate(commands):
        assert "--nnodes=3 --rdzv-backend=c10d --rdzv-endpoint=head:29400 --rdzv-id=job7" in command
        assert f"--rdzv-conf=is_host={int(k == 0)}" in command
        assert command.endswith(f"-m archopt_plugins.recipe.worker {tmp_path / 'recipe.yaml'} --out {tmp_path} --resume")


def test_run_prints_the_per_node_commands_without_a_node_rank(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny(**{"backend.kind": "ddp", "launch.nodes": 2,
                                                     "batch.micro_batch_size": 2}))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "node 0:" in out and "node 1:" in out and "--node-rank K" in out
    assert (tmp_path / "out" / "recipe.yaml").exists() and not (tmp_path / "out" / "archopt_muon").exists()
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--node-rank", "1", "--dry-run"]) == 0
    assert "--rdzv-conf=is_host=0" in capsys.readouterr().out


def test_slurm_script_is_valid_bash_and_launches_one_torchrun_per_node(tmp_path, capsys):
    gpu = ROOT / "recipes" / "gpu" / "llama_1b_ddp_8gpu_x4.yaml"
    assert main(["slurm", str(gpu), "--out", str(tmp_path / "job"), "--set", "launch.slurm.partition=gpu"]) == 0
    script = (tmp_path / "job" / "job.sbatch").read_text()
    assert "sbatch" in capsys.readouterr().out
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00"]:
        assert line in script.splitlines(), line
    assert "--nproc-per-node=8" in script and '--rdzv-endpoint="$head_node:29500"' in script
    assert "archopt_plugins.recipe.worker" in script and str(tmp_path / "job" / "recipe.yaml") in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "job" / "job.sbatch")]).returncode == 0


def test_cpu_slurm_script_asks_for_no_gpus(tmp_path):
    recipe = validate_data(tiny(**{"backend.kind": "ddp", "launch.nodes": 2, "batch.micro_batch_size": 2}))
    script = slurm_script(recipe, tmp_path / "recipe.yaml", tmp_path)
    assert "--gpus-per-node" not in script and "#SBATCH --nodes=2" in script
