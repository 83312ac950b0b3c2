"""The names the pack and its clients share: websocket events and HTTP routes.

Plain constants, no imports: the nodes, the developer tools (API client, demo, load test, benchmark) and the tests
all read them from here. The web extension (``web/nested_diffusion.js``) spells the same strings.
"""

OUTER_STEP_EVENT = "nested_diffusion.outer_step"  # after every inner diffusion: outer_step, nfe, nfe_total, sigma, ...
CANDIDATES_EVENT = "nested_diffusion.candidates"  # after every inner diffusion: a small preview of every batch item
PICKED_EVENT = "nested_diffusion.picked"  # a run dropped all batch items but the one picked

FINISH_ROUTE = "/nested_diffusion/finish"  # POST {prompt_id, node_id, client_id}: end after this inner diffusion
RUNNING_ROUTE = "/nested_diffusion/running"  # GET ?client_id=: the runs that client can finish or pick in
PICK_ROUTE = "/nested_diffusion/pick"  # POST {prompt_id, node, index, client_id}: keep only that batch item
# Only on a master with ComfyUI-Distributed installed (nodes/distributed.py): the same for every server of its job.
JOB_FINISH_ROUTE = "/nested_diffusion/job/finish"  # POST {prompt_id, node_id, client_id}: the master's prompt
JOB_PICK_ROUTE = "/nested_diffusion/job/pick"  # POST {prompt_id, node, index, server, client_id}: others finish

# Added by the server's prompt handler to each NestedKSampler / NestedKSamplerAdvanced node's inputs (seen in
# /history's prompt): whether any node takes its outer_previews output (nodes/previews_wanted.py).
OUTER_PREVIEWS_MARK = "nested_outer_previews_taken"
