"""Without ComfyUI-Distributed among the custom nodes the pack adds no job routes (the shared test server has none)."""
from __future__ import annotations

import requests
from comfyui_nested_diffusion.protocol import FINISH_ROUTE, JOB_FINISH_ROUTE, JOB_PICK_ROUTE


def test_no_job_routes_without_comfyui_distributed(comfy_server):
    for route in (JOB_FINISH_ROUTE, JOB_PICK_ROUTE):
        answer = requests.post(f"{comfy_server.url}{route}", json={"prompt_id": "p", "node_id": "1"}, timeout=30)
        assert answer.status_code in (404, 405), (route, answer.status_code, answer.text[:200])
    # the single-server route is there, and answers in JSON
    answer = requests.post(f"{comfy_server.url}{FINISH_ROUTE}", json={"prompt_id": "p", "node_id": "1"}, timeout=30)
    assert answer.status_code in (404, 409) and "error" in answer.json()
    assert "ComfyUI-Distributed found" not in comfy_server.log_text()
