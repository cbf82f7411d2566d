"""`posettp demo`: the whole system on synthetic persons, end to end, with embedded defaults.

Steps (each logs to `{out}/logs/{step}.log`; a failure names the step and its log):
1. synth      generate a small synthetic persons dataset
2. train      a brief fine-tune through Ray Train of the shipped `synth_small` checkpoint (trained by the project's
              own commands, recorded in its config.json; a model trained from scratch in the demo's minutes is too
              weak for personalization to act on), with the flip test on (reused when
              `{out}/runs/demo/latest.json` exists)
3. federate   Flower simulation: every test person personalizes offline; one more run online
4. serve      start the Ray Serve app over the delta store
5. query      POST every test frame over HTTP: PCK base vs personalized, as served
6. report     `{out}/report.md` + PNGs

Every child process carries an environment marker, and on exit -- normal, error or
Ctrl-C -- everything with that marker (Ray, Flower's SuperLink, Serve) is stopped.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml

from data.shards import list_persons
from model.config import config_path
from server.flower_app import write_app

from .demo_report import query_persons, write_report
from .procs import flower_env, stop_marked

MARKER = "POSETTP_DEMO_RUN"
PERSONS, FRAMES, SIZE = 30, 30, 96  # -> 18 train, 3 val, 9 test persons at the calibrated default shift
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "synth_small"
TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 100, 8, 1e-4  # per worker; 2 workers: a fine-tune of PRETRAINED
TTP_STEPS = 60
ANSWERED = ("stored", "unchanged")  # a Flower run's per-person outcomes that are not failures


class StepFailed(RuntimeError):
    pass


class Demo:
    def __init__(self, out: Path):
        self.out = out.resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.marker = os.environ.get(MARKER) or uuid.uuid4().hex  # a caller may choose it to audit cleanup
        self.env = flower_env(self.out / "flwr-home", **{MARKER: self.marker})
        self.timings: dict[str, float] = {}
        self.steps_done = 0
        self.data = self.out / "data"
        self.store = self.out / "store"

    def run(self, step: str, cmd: list[str], timeout: float = 1800) -> str:
        """Run one command to completion, output to its log; raise StepFailed naming the log."""
        log = self.logs / f"{step}.log"
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=self.out, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise StepFailed(f"step {step} failed (exit {proc.returncode}); see {log}")
        return log.read_text()

    def step(self, name: str, fn):
        self.steps_done += 1
        print(f"[{self.steps_done}/5] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - t0
        print(f"      {name} done in {self.timings[name]:.0f} s", flush=True)
        return result

    # 1
    def synth(self) -> None:
        if (self.data / "manifest.json").is_file():
            return
        self.run("synth", [sys.executable, "-m", "posettp.cli", "synth", "--out", str(self.data), "--persons",
                           str(PERSONS), "--frames", str(FRAMES), "--size", str(SIZE), "--seed", "0"])

    # 2
    def train(self) -> str:
        latest = self.out / "runs" / "demo" / "latest.json"
        if not latest.is_file():
            self.run("train", [sys.executable, "-m", "posettp.cli", "train", "--config", "synth_small",
                               "--set", f"data.url={self.data}", "--set", f"train.init_from={PRETRAINED}",
                               "--set", "model.flip_test=true", "--set", f"train.max_steps={TRAIN_STEPS}",
                               "--set", f"train.batch_size={TRAIN_BATCH}", "--set", f"train.lr={TRAIN_LR}",
                               "--set", "train.report_every=250", "--workers", "2",
                               "--storage", str(self.out / "runs"), "--name", "demo"])
        record = json.loads(latest.read_text())
        return (record.get("best") or record)["checkpoint"]  # the best by validation PCK

    # 3
    def federate(self, checkpoint: str) -> dict:
        persons = list_persons(str(self.data), "test")
        app = self.out / "flower-app"  # the app as an installed package writes it: no checkout needed
        shutil.rmtree(app, ignore_errors=True)
        write_app(app)
        runs = {}
        for scenario, store, nodes in (("offline", self.store, len(persons)),
                                       ("online", self.out / "store-online", 1)):
            run_config = (f'base-checkpoint="{checkpoint}" data="{self.data}" scenario="{scenario}" '
                          f'storage="{store}" ttp-steps={TTP_STEPS}')
            self.run("federate", ["flwr", "run", str(app), "--stream", "--run-config", run_config, "--federation-config",
                                  f"num-supernodes={nodes} client-resources-num-cpus=1"])
            summaries = sorted((store / "fl-runs").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
            if not summaries:
                raise StepFailed(f"step federate: Flower wrote no run summary; see {self.logs / 'federate.log'}")
            summary = json.loads(summaries[-1].read_text())
            # a person whose safeguards kept the base weights ("unchanged") is an outcome, not a failure
            answered = [p["status"] for p in summary.get("persons", {}).values() if p["status"] in ANSWERED]
            if summary.get("status") != "finished" or len(answered) != nodes:
                raise StepFailed(f"step federate: {scenario} run {summary.get('status')}, {len(answered)} of {nodes} "
                                 f"persons stored a delta or kept the base ({summary.get('reason', 'see the log')}); "
                                 f"see {self.logs / 'federate.log'}")
            runs[scenario] = summary
        stop_marked("FLWR_HOME", self.env["FLWR_HOME"])  # the simulation's detached SuperLink
        return runs

    # 4 + 5
    def serve_and_query(self, checkpoint: str) -> dict:
        port = _free_port()
        # the shipped config with auth off (the demo has no tokens) and the flip test on, as the model was evaluated
        config = self.out / "serve.yaml"
        doc = yaml.safe_load(config_path("serve").read_text())
        doc["applications"][0]["args"].update(auth=False, flip_test=True)
        config.write_text(yaml.safe_dump(doc))
        log = open(self.logs / "serve.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "posettp.cli", "serve", "--checkpoint", checkpoint,
                                 "--store", str(self.store), "--port", str(port), "--config", str(config)],
                                cwd=self.out, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_http(f"http://127.0.0.1:{port}/healthz", proc, self.logs / "serve.log")
            self.timings["serve"] = time.perf_counter() - self._t_serve
            t0 = time.perf_counter()
            result = query_persons(f"http://127.0.0.1:{port}", str(self.data))
            self.timings["query"] = time.perf_counter() - t0
            return result
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepFailed(f"step serve: the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise StepFailed(f"step serve: {url} not healthy after {timeout:.0f} s; see {log}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(args) -> int:
    # Ctrl-C and SIGTERM both end in the cleanup below, even when started with SIGINT ignored (nohup, CI)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo(Path(args.out))
    t0 = time.perf_counter()
    try:
        demo.step("synth", demo.synth)
        checkpoint = demo.step("train", demo.train)
        fl = demo.step("federate", lambda: demo.federate(checkpoint))
        demo._t_serve = time.perf_counter()
        served = demo.step("serve+query", lambda: demo.serve_and_query(checkpoint))
        report = demo.step("report", lambda: write_report(demo.out, checkpoint, str(demo.data), served, fl,
                                                          demo.timings))
    except StepFailed as exc:
        print(f"posettp demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nposettp demo: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        stopped = stop_marked(MARKER, demo.marker)
        if stopped:
            print(f"stopped {len(stopped)} leftover processes", file=sys.stderr)
        shutil.rmtree(demo.out / "flwr-home", ignore_errors=True)
    print(f"\ndemo finished in {(time.perf_counter() - t0) / 60:.1f} min; report: {report}")
    return 0
