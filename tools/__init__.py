"""Developer tooling shared by the tests, the benchmark, the demo and the load test: the ComfyUI bootstrap
(``comfy_env``), the server helper (``comfy_server``), the API client (``comfy_api_client``), the test and
benchmark models (``models``) and the workflow builders (``workflows``). Never imported by the nodes."""
