"""ESamp through SGLang's offline Engine API (`sglang.Engine`), in a process of its own.

The Engine loads the plugin itself, before it builds its ServerArgs; server-wide ESamp
settings come from the command-line parser with the plugin loaded (as SGLang's offline
benchmark does it), per-request ones from `custom_params`.
"""

import json
import subprocess
import sys
import textwrap

from sgl_esamp.tools.launch import machine_args, server_env

ENGINE_ARGS = ["--sampler", "esamp", "--esamp-slots", "3", "--random-seed", "0",
               "--max-total-tokens", "65536", "--max-running-requests", "8"]

SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys

    import sglang as sgl
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    def main():
        load_plugins()  # before parsing: the plugin adds --sampler and --esamp-*
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        argv = ["--model-path", sys.argv[1], *json.loads(sys.argv[2])]
        llm = sgl.Engine(server_args=ServerArgs.from_cli_args(parser.parse_args(argv)))
        report = {}
        try:
            sampling = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6}
            outs = llm.generate(["The quick brown fox", "Once upon a time"], {**sampling, "n": 2})
            report["esamp"] = [o["meta_info"].get("esamp") for o in outs]
            plain = llm.generate("Hello", {**sampling, "custom_params": {"sampling": "plain"}})
            report["plain"] = plain["meta_info"].get("esamp")
            try:
                llm.generate("Hello", {**sampling, "custom_params": {"beta": -1}})
                report["bad_beta"] = "accepted"
            except ValueError as err:
                report["bad_beta"] = str(err)
            report["after_error"] = llm.generate("Hello", sampling)["meta_info"].get("esamp")
            report["bank"] = llm.get_server_info()["internal_states"][0]["esamp"]
        finally:
            llm.shutdown()
        print("REPORT " + json.dumps(report))

    if __name__ == "__main__":
        main()
    """
)


def test_offline_engine_samples_with_esamp(tiny_model, tmp_path):
    script = tmp_path / "engine_esamp.py"
    script.write_text(SCRIPT)
    engine_args = machine_args(ENGINE_ARGS) + ENGINE_ARGS  # the CPU engine's arguments on a machine without CUDA
    run = subprocess.run([sys.executable, str(script), str(tiny_model), json.dumps(engine_args)], capture_output=True,
                         text=True, env=server_env(), timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])

    infos = report["esamp"]
    assert all(info["enabled"] and info["esamp_tokens"] > 0 and info["train_steps"] > 0 for info in infos)
    # n = 2 per prompt: each prompt's two samples share one group, the two prompts do not
    groups = [info["group_id"] for info in infos]
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]
    assert report["plain"] is None or not report["plain"]["enabled"]
    assert "custom_params.beta" in report["bad_beta"] and "[0.0, 10.0]" in report["bad_beta"]
    assert report["after_error"]["enabled"]
    # --esamp-slots reached the Engine's scheduler: the server's variant's bank (the only one a
    # server builds by default, --esamp-variants auto) has 3
    by_variant = report["bank"]["by_variant"]
    assert set(by_variant) == {"latent"}
    assert {bank["slots_total"] for bank in by_variant.values()} == {3}
    assert report["bank"]["slots_total"] == 3 * len(by_variant)
