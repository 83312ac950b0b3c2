"""Nested runs over ComfyUI-Distributed: a master and two workers (three real ComfyUI servers on 127.0.0.1, each with
its own base, output, temp and user folders), the pack and ComfyUI-Distributed 1.4.4 in every ``custom_nodes``.

A job (DistributedSeed -> NestedKSampler on the digits model -> VAEDecode -> DistributedCollector -> SaveImage, plus
outer_previews -> OuterStepPreview -> DistributedCollector -> SaveImage) queued with ``POST /distributed/queue``:
its finals equal single-server runs at seeds s, s+1, s+2 and every outer-step image reaches the master; Finish now on
the master (``/nested_diffusion/job/finish``) ends all three runs with images; a pick of a worker's candidate keeps it
there and finishes the others; a worker killed mid-run does not hold the master past ComfyUI-Distributed's timeout.

ComfyUI-Distributed comes from ``../shared/distributed/`` beside the checkout; without it the server tests skip.
"""
from __future__ import annotations

import json
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from api_helpers import decode
from comfyui_nested_diffusion.protocol import CANDIDATES_EVENT, JOB_FINISH_ROUTE, JOB_PICK_ROUTE, OUTER_STEP_EVENT, PICKED_EVENT
from conftest import TEST_SERVER_NODES

DISTRIBUTED_TARBALL = Path(__file__).resolve().parents[3] / "shared" / "distributed" / \
    "ComfyUI-Distributed-1.4.4.tar.gz"
needs_distributed = pytest.mark.skipif(not DISTRIBUTED_TARBALL.exists(), reason=(
    f"ComfyUI-Distributed is not at {DISTRIBUTED_TARBALL} (a clone without ../shared/distributed)"))

WORKER_TIMEOUT = 5  # ComfyUI-Distributed's worker_timeout_seconds on the test master
BATCH = 2
SAMPLER, FINALS, STRIP = "7", "11", "14"


def job_graph(seed: int, *, outer: int, inner: int, seconds_per_call: float, distributed: bool = True) -> dict:
    """The job's API prompt; ``distributed=False``: the same sampling without ComfyUI-Distributed's nodes."""
    prompt = {
        "1": {"class_type": "NestedDigitsModel", "inputs": {"variant": "eps"}},
        "2": {"class_type": "NestedDiffusionTestSlowModel", "inputs": {"model": ["1", 0],
                                                                       "seconds_per_call": seconds_per_call}},
        "3": {"class_type": "NestedDigitsPrompt", "inputs": {"digit": "3"}},
        "4": {"class_type": "NestedDigitsPrompt", "inputs": {"digit": "any"}},
        "5": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 16, "height": 16,
                                                                         "batch_size": BATCH}},
        "6": {"class_type": "DistributedSeed", "inputs": {"seed": seed}},
        SAMPLER: {"class_type": "NestedKSampler", "inputs": {
            "model": ["2", 0], "seed": ["6", 0], "outer_steps": outer, "inner_steps": inner, "cfg": 2.0,
            "sampler_name": "euler_ancestral", "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": ["8", 0]}},
        "10": {"class_type": "DistributedCollector", "inputs": {"images": ["9", 0], "load_balance": False}},
        FINALS: {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "job_final"}},
        "12": {"class_type": "OuterStepPreview", "inputs": {"previews": [SAMPLER, 1], "vae": ["8", 0]}},
        "13": {"class_type": "DistributedCollector", "inputs": {"images": ["12", 0], "load_balance": False}},
        STRIP: {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "job_strip"}},
    }
    if not distributed:
        del prompt["6"], prompt["10"], prompt["13"]
        prompt[SAMPLER]["inputs"]["seed"] = seed
        prompt[FINALS]["inputs"]["images"] = ["9", 0]
        prompt[STRIP]["inputs"]["images"] = ["12", 0]
    return prompt


# -- the pure parts, no server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed_module(pack):
    from comfyui_nested_diffusion.nodes import distributed

    return distributed


def test_job_read_from_collectors(distributed_module):
    prompt = {"1": {"class_type": "DistributedCollector", "inputs": {"multi_job_id": "exec_1_ab_1",
                                                                     "enabled_worker_ids": '["2", "1"]'}},
              "2": {"class_type": "DistributedCollector", "inputs": {"multi_job_id": "exec_1_ab_2",
                                                                     "enabled_worker_ids": '["1"]'}},
              "3": {"class_type": "NestedKSampler", "inputs": {}}}
    assert distributed_module.job_ids(prompt) == {"exec_1_ab_1", "exec_1_ab_2"}
    assert distributed_module.job_worker_ids(prompt) == ["2", "1"]
    assert distributed_module.job_ids({"3": prompt["3"]}) == frozenset()
    queue = {"queue_running": [[0, "other", {"3": prompt["3"]}, {"client_id": "c"}, []]],
             "queue_pending": [[1, "mine", prompt, {"client_id": "c"}, []]]}
    assert distributed_module.find_job_prompt(queue, frozenset({"exec_1_ab_2"})) == ("mine", "c", False)
    assert distributed_module.find_job_prompt(queue, frozenset({"exec_9"})) is None


def test_worker_url_follows_distributed_rule(distributed_module):
    url = distributed_module.worker_url
    assert url({"host": "127.0.0.1", "port": 8282}) == "http://127.0.0.1:8282"
    assert url({"host": "", "port": 8283}, "10.0.0.2") == "http://10.0.0.2:8283"
    assert url({"host": "https://w.example/", "port": 1}) == "https://w.example"
    assert url({"host": "gpu.example", "port": 443}) == "https://gpu.example"


def test_installed_only_with_a_distributed_folder(distributed_module, tmp_path):
    assert not distributed_module.distributed_installed([str(tmp_path)])
    (tmp_path / "ComfyUI-Distributed.disabled").mkdir()
    (tmp_path / "ComfyUI-Distributed.disabled" / "pyproject.toml").write_text('name = "ComfyUI-Distributed"')
    assert not distributed_module.distributed_installed([str(tmp_path)])
    (tmp_path / "comfyui-distributed").mkdir()
    (tmp_path / "comfyui-distributed" / "pyproject.toml").write_text('[project]\nname = "ComfyUI-Distributed"\n')
    assert distributed_module.distributed_installed([str(tmp_path)])


def test_example_workflow_files_are_built_and_twins_agree(pack):
    from comfyui_nested_diffusion.tools import distributed_workflow as dw
    from comfyui_nested_diffusion.tools import workflow_checks as wc

    assert dw.main(["--check"]) == 0, "run: scripts/python.sh -m comfyui_nested_diffusion.tools.distributed_workflow"
    editor = wc.load(dw.OUT_DIR / f"{dw.NAME}.json")
    api = wc.load(dw.OUT_DIR / f"{dw.NAME}_api.json")
    info = dw.object_info()
    assert wc.editor_problems(editor, info) == []
    assert wc.api_differences(api, wc.editor_to_api(editor, info), info) == []
    assert api[str(dw.SAMPLER_NODE)]["inputs"]["seed"] == [str(dw.SEED_NODE), 0]  # every server its own seed


# -- three real servers --------------------------------------------------------------------------------------------
class Recorder:
    """Every websocket event one client id gets from one server, with its arrival time, on a thread."""

    def __init__(self, url: str, client_id: str):
        from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient

        self.api = ComfyAPIClient(url, client_id=client_id).connect()
        self.events: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self.api.events(timeout=0.3):
                    self.events.append((time.monotonic(), event))
            except Exception:
                return  # the server went away

    def of(self, kind: str, node: str = SAMPLER) -> list[tuple[float, dict]]:
        return [(t, e) for t, e in list(self.events) if e["type"] == kind and e["data"].get("node") == node]

    def sampler_end(self, after: float) -> float | None:
        """When the sampler handed over to the next node (the first ``executing`` of another node after it)."""
        started = False
        for t, event in list(self.events):
            if event["type"] != "executing" or t < after:
                continue
            node = event["data"].get("node")
            started = started or node == SAMPLER
            if started and node not in (SAMPLER, None):
                return t
        return None

    def clear(self) -> None:
        self.events.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.api.close()


def _extract(into: Path) -> Path:
    with tarfile.open(DISTRIBUTED_TARBALL) as archive:
        archive.extractall(into, filter="data")
    return next(into.iterdir())


@pytest.fixture(scope="module")
def cluster(comfy, tmp_path_factory, request):
    if not DISTRIBUTED_TARBALL.exists():
        pytest.skip(f"ComfyUI-Distributed is not at {DISTRIBUTED_TARBALL} (a clone without ../shared/distributed)")
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer, free_port

    root = tmp_path_factory.mktemp("distributed")
    ports = {"master": free_port(), "1": free_port(), "2": free_port()}
    servers = {}
    for role, port in ports.items():
        extension = _extract(root / f"ext_{role}")
        if role == "master":
            config = {"master": {"host": "127.0.0.1"},
                      "workers": [{"id": w, "name": f"w{w}", "host": "127.0.0.1", "port": ports[w], "enabled": True,
                                   "type": "local"} for w in ("1", "2")],
                      "settings": {"worker_timeout_seconds": WORKER_TIMEOUT}}
            (extension / "gpu_config.json").write_text(json.dumps(config))
        extra_args = [] if role == "master" else list(getattr(request.module, "WORKER_EXTRA_ARGS", []))
        servers[role] = ComfyServer(port=port, startup_timeout=180, env={"OMP_NUM_THREADS": "1"}, extra_args=extra_args,
                                    extra_custom_nodes=[extension, TEST_SERVER_NODES])
    failures = []

    def start(server):
        try:
            server.start()
        except Exception as error:  # reported below, with the others stopped
            failures.append(error)

    threads = [threading.Thread(target=start, args=(server,)) for server in servers.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if failures:
            raise failures[0]
        yield servers
    finally:
        # ComfyUI-Distributed's SIGTERM handler stops the event loop without ending the process: kill after 2 s
        stoppers = [threading.Thread(target=server.stop, kwargs={"timeout": 2.0}) for server in servers.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()


@pytest.fixture
def job(cluster):
    """Queue jobs on the master as one client, with that client's events recorded on every server."""
    client_id = uuid.uuid4().hex
    recorders = {role: Recorder(server.url, client_id) for role, server in cluster.items() if server.running}

    class Job:
        def __init__(self):
            self.client_id, self.recorders, self.servers = client_id, recorders, cluster

        def queue(self, prompt: dict) -> str:
            answer = requests.post(f"{cluster['master'].url}/distributed/queue", timeout=60,
                                   json={"prompt": prompt, "client_id": client_id, "enabled_worker_ids": ["1", "2"]})
            assert answer.status_code == 200, answer.text
            return answer.json()["prompt_id"]

        def wait_outer_steps(self, count: int, roles, timeout: float = 90) -> None:
            deadline = time.monotonic() + timeout
            while any(len(recorders[role].of(OUTER_STEP_EVENT)) < count for role in roles):
                assert time.monotonic() < deadline, {r: len(recorders[r].of(OUTER_STEP_EVENT)) for r in roles}
                time.sleep(0.05)

        def steer(self, route: str, body: dict) -> requests.Response:
            return requests.post(f"{cluster['master'].url}{route}", json={**body, "client_id": client_id}, timeout=30)

    yield Job()
    for recorder in recorders.values():
        recorder.close()


def wait_history(url: str, prompt_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = requests.get(f"{url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")


def saved_images(url: str, entry: dict, node: str) -> list:
    return [decode(requests.get(f"{url}/view", timeout=10, params={k: item[k] for k in ("filename", "subfolder", "type")}
                                ).content) for item in entry["outputs"].get(node, {}).get("images", [])]


def same(a, b) -> bool:
    return a.size == b.size and max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())) <= 1


@needs_distributed
def test_job_equals_single_server_runs_and_collects_every_outer_step(cluster, job):
    seed, outer, inner = 20261207, 3, 6
    master = cluster["master"].url
    entry = wait_history(master, job.queue(job_graph(seed, outer=outer, inner=inner, seconds_per_call=0.0)), 120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    finals, strip = saved_images(master, entry, FINALS), saved_images(master, entry, STRIP)
    assert len(finals) == 3 * BATCH
    assert len(strip) == 3 * BATCH * outer  # every server's every outer-step image, on the master
    singles = []
    for offset in range(3):  # DistributedSeed: the master's seed, worker i's seed + i + 1
        single = requests.post(f"{master}/prompt", timeout=30, json={"prompt": job_graph(
            seed + offset, outer=outer, inner=inner, seconds_per_call=0.0, distributed=False)}).json()["prompt_id"]
        singles.append(saved_images(master, wait_history(master, single, 120), FINALS))
    batches = [finals[i:i + BATCH] for i in range(0, len(finals), BATCH)]
    assert all(same(a, b) for a, b in zip(batches[0], singles[0]))  # the master's own images come first
    for single in singles[1:]:
        assert any(all(same(a, b) for a, b in zip(batch, single)) for batch in batches[1:]), "a worker's finals differ"
    assert not same(singles[1][0], singles[2][0])  # the workers really ran other seeds


@needs_distributed
def test_example_workflow_runs_on_every_server(cluster, job):
    from comfyui_nested_diffusion.tools import distributed_workflow as dw

    prompt = json.loads((dw.OUT_DIR / f"{dw.NAME}_api.json").read_text(encoding="utf-8"))
    entry = wait_history(cluster["master"].url, job.queue(prompt), 120)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saves = sorted((node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"),
                   key=lambda node_id: prompt[node_id]["inputs"]["filename_prefix"])
    counts = [len(entry["outputs"].get(node_id, {}).get("images", [])) for node_id in saves]
    assert counts == [3 * 2, 3 * 2 * 4]  # final, outer_step: batch 2, 4 outer steps, three servers


@needs_distributed
def test_finish_now_on_the_master_ends_every_server_run(cluster, job):
    outer, inner, seconds = 4, 25, 0.06
    prompt_id = job.queue(job_graph(7, outer=outer, inner=inner, seconds_per_call=seconds))
    job.wait_outer_steps(1, ("master", "1", "2"))
    posted = time.monotonic()
    answer = job.steer(JOB_FINISH_ROUTE, {"prompt_id": prompt_id, "node_id": SAMPLER})
    answered = time.monotonic() - posted
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["acted_on"]) == ["1", "2", "master"], answer.json()
    entry = wait_history(cluster["master"].url, prompt_id, 60)
    done = time.monotonic() - posted
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(saved_images(cluster["master"].url, entry, FINALS)) == 3 * BATCH
    ends = {role: recorder.sampler_end(posted - 30) for role, recorder in job.recorders.items()}
    steps = {role: len(recorder.of(OUTER_STEP_EVENT)) for role, recorder in job.recorders.items()}
    assert all(end is not None for end in ends.values()), ends
    assert all(count < outer for count in steps.values()), steps  # no server ran on to its last outer step
    latency = {role: round(end - posted, 3) for role, end in ends.items()}
    print(f"\nfinish now across 3 servers: answer {answered:.3f} s, sampler ends after the post {latency}, "
          f"collector done after {done:.3f} s (one inner diffusion: {inner} calls x {seconds} s + the model)")
    # each run ends at its next model call; 2 busy cores give the three servers' calls their turns
    assert max(latency.values()) < inner * seconds + 3.0, latency


@needs_distributed
def test_pick_of_a_worker_candidate_keeps_it_there_and_finishes_the_others(cluster, job):
    outer, inner, seconds = 3, 15, 0.06
    prompt_id = job.queue(job_graph(11, outer=outer, inner=inner, seconds_per_call=seconds))
    job.wait_outer_steps(1, ("master", "1", "2"))
    assert job.recorders["1"].of(CANDIDATES_EVENT), "the worker's candidates reach the client that queued the job"
    refused = job.steer(JOB_PICK_ROUTE, {"prompt_id": prompt_id, "node": SAMPLER, "index": BATCH, "server": "1"})
    assert refused.status_code == 400 and "out of range" in refused.json()["error"]
    stranger = requests.post(f"{cluster['master'].url}{JOB_PICK_ROUTE}", timeout=30, json={
        "prompt_id": prompt_id, "node": SAMPLER, "index": 1, "server": "1", "client_id": "someone-else"})
    assert stranger.status_code == 403
    answer = job.steer(JOB_PICK_ROUTE, {"prompt_id": prompt_id, "node": SAMPLER, "index": 1, "server": "1"})
    assert answer.status_code == 200, answer.text
    statuses = {report["server"]: report["status"] for report in answer.json()["servers"]}
    assert statuses == {"1": 200, "master": 200, "2": 200}, answer.json()
    entry = wait_history(cluster["master"].url, prompt_id, 90)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(saved_images(cluster["master"].url, entry, FINALS)) == 2 * BATCH + 1  # the worker kept one item
    assert job.recorders["1"].of(PICKED_EVENT) and not job.recorders["master"].of(PICKED_EVENT)
    steps = {role: len(recorder.of(OUTER_STEP_EVENT)) for role, recorder in job.recorders.items()}
    assert steps["1"] == outer and steps["master"] < outer and steps["2"] < outer, steps


@needs_distributed
def test_pick_of_the_master_candidate_finishes_the_workers(cluster, job):
    outer = 3
    prompt_id = job.queue(job_graph(19, outer=outer, inner=12, seconds_per_call=0.06))
    job.wait_outer_steps(1, ("master", "1", "2"))
    answer = job.steer(JOB_PICK_ROUTE, {"prompt_id": prompt_id, "node": SAMPLER, "index": 0, "server": "master"})
    assert answer.status_code == 200, answer.text
    assert {report["server"]: report["status"] for report in answer.json()["servers"]} == {"master": 200, "1": 200,
                                                                                            "2": 200}
    entry = wait_history(cluster["master"].url, prompt_id, 90)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(saved_images(cluster["master"].url, entry, FINALS)) == 1 + 2 * BATCH
    steps = {role: len(recorder.of(OUTER_STEP_EVENT)) for role, recorder in job.recorders.items()}
    assert steps["master"] == outer and steps["1"] < outer and steps["2"] < outer, steps


@needs_distributed
def test_finish_reaches_worker_prompts_queued_without_a_client_id(cluster, job):
    """ComfyUI-Distributed's HTTP dispatch queues the workers' copies without a client id: the master forwards with
    none (and their events go to every socket of the worker, the recorders' too)."""
    master = cluster["master"].url

    def websocket_dispatch(on: bool) -> None:
        requests.post(f"{master}/distributed/config/update_setting", timeout=30,
                      json={"key": "websocket_orchestration", "value": on}).raise_for_status()

    outer = 3
    websocket_dispatch(False)
    try:
        prompt_id = job.queue(job_graph(17, outer=outer, inner=15, seconds_per_call=0.06))
        job.wait_outer_steps(1, ("master", "1", "2"))
        worker_prompt = requests.get(f"{cluster['1'].url}/queue", timeout=30).json()["queue_running"][0]
        assert "client_id" not in worker_prompt[3] or worker_prompt[3]["client_id"] is None
        answer = job.steer(JOB_FINISH_ROUTE, {"prompt_id": prompt_id, "node_id": SAMPLER})
    finally:
        websocket_dispatch(True)
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["acted_on"]) == ["1", "2", "master"], answer.json()
    entry = wait_history(master, prompt_id, 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len(saved_images(master, entry, FINALS)) == 3 * BATCH
    steps = {role: len(recorder.of(OUTER_STEP_EVENT)) for role, recorder in job.recorders.items()}
    assert all(count < outer for count in steps.values()), steps


@needs_distributed
def test_a_worker_killed_mid_run_does_not_hang_the_master(cluster, job):
    outer, inner, seconds = 4, 25, 0.06
    prompt_id = job.queue(job_graph(13, outer=outer, inner=inner, seconds_per_call=seconds))
    job.wait_outer_steps(1, ("master", "1", "2"))
    cluster["2"].process.kill()
    killed = time.monotonic()
    answer = job.steer(JOB_FINISH_ROUTE, {"prompt_id": prompt_id, "node_id": SAMPLER})
    assert answer.status_code == 200, answer.text
    statuses = {report["server"]: report["status"] for report in answer.json()["servers"]}
    assert statuses == {"master": 200, "1": 200, "2": 502}, answer.json()
    assert time.monotonic() - killed < 10
    entry = wait_history(cluster["master"].url, prompt_id, WORKER_TIMEOUT + 30)
    waited = time.monotonic() - killed
    print(f"\nworker killed: the master's prompt ended {waited:.1f} s later ({entry['status']['status_str']}), "
          f"ComfyUI-Distributed's worker timeout {WORKER_TIMEOUT} s")
    assert waited < WORKER_TIMEOUT + 20
