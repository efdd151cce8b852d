"""Cache memory that follows the placement: a request holds blocks and state pages only for the
(layer, mixer) pairs its placement runs.

vLLM's KV-cache manager gives every request blocks in every cache group. Left to itself it makes one
group per mixer kind spanning every layer (an unthinned supernet has four: FA, SWA, GDN, KDA), so any
request holds an all-FA footprint plus the SWA window plus two state pages per layer, whatever its
placement. This module changes two things, both in the engine-core process:

1. **Layout: one cache group per served (layer, mixer)** (`per_mixer_groups`, in place of vLLM's
   `get_kv_cache_groups` for supernets). vLLM lays the groups over one memory region with one page size
   (attention block sizes raised, state pages padded, as for any hybrid model) and one block pool; a
   block id belongs to one group at a time, and a block is one page of one layer. Finer groups cannot be
   had (a group is the unit that shares a block table) and coarser ones would make a hybrid request hold
   pages for layers it never runs (FA in 2 of 6 layers inside an all-layer FA group: 3x its bytes).
2. **Allocation by placement** (`PlacementAllocation`): each request sees the managers of its own groups
   and a stand-in (`UnusedGroup`, no blocks, no work) for every other one. vLLM's coordinator loops
   (admission, growth, freeing, preemption and resume, caching) run unchanged over that view, so every
   count the scheduler makes, its budget and its admission gate included, is the request's own
   footprint; a prefix-cache lookup matches only the request's groups (the placement hash is in the
   cache salt, so no other placement's blocks could match anyway). The loops that do not index groups
   (growth, skipped window blocks, freeing; `_OWN_GROUPS_ONLY`) run over the request's own managers alone,
   their per-group results put back at the groups' ids: a decode step's bookkeeping then grows with the
   groups a request uses, not with all of them.

On the worker a group a request does not use has an empty block-table row for it, and the layers read only
the rows of the requests their mixer runs (`batch.StepRequests`). The runner patches in `patches.py` keep
vLLM's per-group work to the groups a step's requests hold blocks in (`_skip_idle_groups`: metadata, slot
mappings, the decodes-first reorder) and skip the groups a request does not hold in prefix caching's state
copies (`_patch_mamba_copies`).

vLLM 0.32 internals relied on (read at the source):
- `vllm.v1.core.kv_cache_utils.get_kv_cache_groups(vllm_config, kv_cache_spec)`, looked up by module
  attribute from `get_kv_cache_configs` and the runner; `unify_kv_cache_spec_page_size` and
  `create_kv_cache_group_specs` build the groups as vLLM's own hybrid path does.
- `KVCacheCoordinator` (vllm/v1/core/kv_cache_coordinator.py) does every per-request operation by
  looping over `self.single_type_managers` (`get_num_blocks_to_allocate`, `allocate_new_computed_blocks`,
  `allocate_new_blocks`, `cache_blocks`, `free`, `pop_blocks_for_free`, `remove_skipped_blocks`,
  `get_blocks`), and `HybridKVCacheCoordinator.find_longest_cache_hit` over `self.attention_groups`
  (spec groups of group ids); `KVCacheManager.get_computed_blocks(request)` is its only caller.
- `Scheduler.add_request(request)` sees every request before it is scheduled (its
  `sampling_params.extra_args` hold the canonical placement the frontend wrote), and
  `Scheduler._free_blocks(request)` frees every finished one's blocks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from shared_spec import Placement
from vllm_supernet.config import MODEL_TYPE
from vllm_supernet.placements import EXTRA_ARGS_KEY, ServingPlacements

logger = logging.getLogger("vllm.supernet")
# Cache layer names are the mixers' checkpoint paths: "...blocks.3.mixer.mixers.gdn" (a supernet block's
# mixer) or "...blocks.3.mixer" (a plain block's only mixer), with ".part1", ... for the further pages of a
# state spread over several (`linear_mixer.StatePages`).
_CACHE_LAYER = re.compile(r"\.blocks\.(\d+)\.mixer(?:\.mixers\.([^.]+))?(?:\.part\d+)?$")


def cache_layer_key(layer_name: str) -> tuple[int, str | None]:
    """(layer index, mixer name or None for a plain block) of a cache layer name (any part of a state)."""
    match = _CACHE_LAYER.search(layer_name)
    if match is None:
        raise ValueError(f"not a supernet cache layer name: {layer_name!r}")
    return int(match.group(1)), match.group(2)


def per_mixer_groups(kv_cache_spec: dict):
    """One KV-cache group per cache layer (one served (layer, mixer)), ordered by layer then mixer, with
    one page size for all (vLLM's own unification: larger attention blocks, padded state pages)."""
    from vllm.v1.core.kv_cache_utils import create_kv_cache_group_specs, unify_kv_cache_spec_page_size

    unified = unify_kv_cache_spec_page_size(kv_cache_spec)
    names = sorted(unified, key=lambda name: (cache_layer_key(name)[0], name))
    return create_kv_cache_group_specs(unified, [[name] for name in names])


def group_users(group_layer_names: list[list[str]]) -> list[tuple[int, str | None]]:
    """Per cache group, the (layer, mixer) whose requests hold blocks in it."""
    keys = []
    for names in group_layer_names:
        found = {cache_layer_key(name) for name in names}
        if len(found) != 1:
            raise ValueError(f"a supernet cache group must hold one (layer, mixer); got {sorted(names)}")
        keys.append(found.pop())
    return keys


def groups_of(placements: list[Placement], users: list[tuple[int, str | None]]) -> frozenset[int]:
    """The cache groups that requests running `placements` (a placement and its draft) hold blocks in."""
    return frozenset(
        group
        for group, (layer, mixer) in enumerate(users)
        if mixer is None or any(placement.mixers[layer] == mixer for placement in placements)
    )


def default_groups(vllm_config, groups: list) -> list:
    """The cache groups a request of the deployment's default placement holds (all of them for any other
    model or layout): what vLLM's start-up check and concurrency figure should count for one request."""
    model_config = vllm_config.model_config
    if not allocates_by_placement(model_config) or not groups:
        return groups
    default = ServingPlacements.from_model_config(model_config).default
    used = groups_of([default], group_users([group.layer_names for group in groups]))
    return [group for index, group in enumerate(groups) if index in used]


def engine_footprints(vllm_config, kv_cache_specs: list[dict]):
    """The deployment's footprints at the attention block size of the workers' specs ({cache layer: spec} per
    worker), which they aligned at start-up."""
    from vllm.v1.kv_cache_interface import AttentionSpec

    from vllm_supernet.footprint import CacheFootprints

    block_sizes = [spec.block_size for specs in kv_cache_specs for spec in specs.values() if isinstance(spec, AttentionSpec)]
    return CacheFootprints.of(vllm_config, block_size=block_sizes[0] if block_sizes else None)


def default_does_not_fit(vllm_config, kv_cache_specs: list[dict], available_memory: int | None = None,
                         num_pages: int | None = None) -> str | None:  # fmt: skip
    """Why one request of the default placement at `max_model_len` cannot fit `num_pages` usable pages (or
    `available_memory` bytes), in the words of the 400 (`footprint.CacheFootprints.too_long`); None if it fits.
    `kv_cache_specs`: the workers' {cache layer: spec}, whose attention block size the engine has aligned."""
    footprints = engine_footprints(vllm_config, kv_cache_specs)
    if num_pages is None:  # block 0 is vLLM's null block
        override = vllm_config.cache_config.num_gpu_blocks_override
        num_pages = (override if override is not None else available_memory // footprints.page_bytes) - 1
    max_len = vllm_config.model_config.max_model_len
    default = ServingPlacements.from_model_config(vllm_config.model_config).default
    reason = footprints.too_long(default, max_len, num_pages)
    if reason is None:
        return None
    from vllm_supernet.speculative import draft_reserve

    reserve = draft_reserve(vllm_config)
    if reserve is not None:
        reason = f"{reason} (its cache is what is left after {reserve.describe()})"
    return f"the default placement cannot serve one request of max_model_len = {max_len}: {reason}"


def without_draft_reserve(vllm_config, available_memory: list[int]) -> list[int]:
    """Each rank's KV-cache memory less the self-speculator's draft slots (`speculative.draft_reserve`), so that
    vLLM sizes its pool, checks one request against it and logs its size and concurrency from what is left."""
    from vllm_supernet.speculative import SLOTS_OVERRIDE_KEY, draft_reserve

    reserve = draft_reserve(vllm_config)
    if reserve is None:
        return available_memory
    smallest = min(available_memory)
    if reserve.bytes >= smallest:
        raise ValueError(
            f"the self-speculator's draft slots do not fit the cache memory: {reserve.describe()}, but a rank has "
            f"{smallest / 2**20:.1f} MiB of cache memory; lower {SLOTS_OVERRIDE_KEY} or max_model_len, draft with "
            "fewer full-attention layers, or start the deployment with more cache memory"
        )
    logger.info("%s; the KV-cache pool has the rest", reserve.describe())
    return [memory - reserve.bytes for memory in available_memory]


class UnusedGroup:
    """A request's stand-in for the manager of a group its placement does not use: it holds nothing and
    asks for nothing, so the coordinator's loops skip the group for that request at the cost of a call."""

    enable_caching = False
    use_eagle = False

    def __init__(self, manager) -> None:
        self.block_size = manager.block_size
        self.kv_cache_spec = manager.kv_cache_spec
        self.req_to_blocks: dict = {}
        self.num_cached_block: dict = {}

    def get_num_blocks_to_allocate(self, *args, **kwargs) -> int:
        return 0

    def allocate_new_blocks(self, *args, **kwargs) -> list:
        return []

    def pop_blocks_for_free(self, request_id: str) -> list:
        return []

    def add_local_computed_blocks(self, *args, **kwargs) -> None:
        pass

    allocate_external_computed_blocks = cache_blocks = free = remove_skipped_blocks = add_local_computed_blocks


@dataclass(frozen=True)
class RequestView:
    """What one request sees of the coordinator: its groups' managers (stand-ins elsewhere) and, for
    prefix-cache lookups, the spec groups restricted to its groups; `own` / `own_managers`: its groups alone,
    in group order, for the loops that do not index groups (`_OWN_GROUPS_ONLY`)."""

    groups: frozenset[int]
    managers: tuple
    attention_groups: list | None
    own: tuple[int, ...] = ()
    own_managers: tuple = ()


def _run_in_view(coordinator, request_id: str | None, method, /, *args, **kwargs):
    """`method` of the coordinator with its loops over the request's own view (`RequestView`); a request
    without one (none in flight) sees every group, as vLLM does."""
    view = coordinator.placement_views.get(request_id) if request_id is not None else None
    if view is None:
        return method(*args, **kwargs)
    shape = _OWN_GROUPS_ONLY.get(method.__name__)
    if shape is not None and (shape != "per_group_argument" or "new_computed_blocks" in kwargs):
        return _run_over_own_groups(coordinator, view, shape, method, args, kwargs)
    saved_managers, coordinator.single_type_managers = coordinator.single_type_managers, view.managers
    saved_groups = getattr(coordinator, "attention_groups", None)
    if view.attention_groups is not None:
        coordinator.attention_groups = view.attention_groups
    try:
        return method(*args, **kwargs)
    finally:
        coordinator.single_type_managers = saved_managers
        if saved_groups is not None:
            coordinator.attention_groups = saved_groups


# Coordinator methods (vLLM 0.32, vllm/v1/core/kv_cache_coordinator.py) whose loop over the managers does not
# use a manager's group id, run over the request's own managers alone instead of all groups with stand-ins
# (a decode step calls the first four for every running request: 12 stand-in calls each for an all-SWA request
# of a 4-layer supernet). "results": one entry per group comes back, put back at the groups' ids;
# "per_group_argument": `new_computed_blocks` (one entry per group) goes in as the request's groups' entries.
_OWN_GROUPS_ONLY = {
    "remove_skipped_blocks": "none",
    "get_num_blocks_to_allocate": "per_group_argument",
    "allocate_new_blocks": "results",
    "free": "none",
    "pop_blocks_for_free": "none",
    "get_blocks": "results",
}


def _run_over_own_groups(coordinator, view: RequestView, shape: str, method, args, kwargs):
    if shape == "per_group_argument":
        kwargs = {**kwargs, "new_computed_blocks": tuple(kwargs["new_computed_blocks"][g] for g in view.own)}
    saved, coordinator.single_type_managers = coordinator.single_type_managers, view.own_managers
    try:
        result = method(*args, **kwargs)
    finally:
        coordinator.single_type_managers = saved
    if shape != "results":
        return result
    every_group = [[] for _ in saved]  # a list of its own for every group, as vLLM's loops make
    for group, blocks in zip(view.own, result, strict=True):
        every_group[group] = blocks
    return tuple(every_group)


# The coordinator's per-request operations, and how each finds its request id in its arguments.
_BY_REQUEST_ID = (
    "get_num_blocks_to_allocate",
    "allocate_new_computed_blocks",
    "allocate_new_blocks",
    "free",
    "pop_blocks_for_free",
    "remove_skipped_blocks",
    "get_blocks",
)


def _request_id_argument(args, kwargs) -> str:
    return kwargs["request_id"] if "request_id" in kwargs else args[0]


def follow_placements(coordinator, manager) -> None:
    """Make the scheduler's KV-cache coordinator run every per-request operation over the request's view,
    and its manager's prefix-cache lookups say whose they are. The methods are wrapped on the instances
    (vLLM's classes are compiled with fixed layouts, so no subclass can be swapped in)."""
    coordinator.placement_views = {}
    coordinator.lookup_request_id = None

    def by_request_id(method):
        return lambda *args, **kwargs: _run_in_view(coordinator, _request_id_argument(args, kwargs), method, *args, **kwargs)

    for name in _BY_REQUEST_ID:
        setattr(coordinator, name, by_request_id(getattr(coordinator, name)))
    cache_blocks = coordinator.cache_blocks
    coordinator.cache_blocks = lambda request, *args, **kwargs: _run_in_view(
        coordinator, request.request_id, cache_blocks, request, *args, **kwargs
    )
    find_longest_cache_hit = coordinator.find_longest_cache_hit
    coordinator.find_longest_cache_hit = lambda *args, **kwargs: _run_in_view(
        coordinator, coordinator.lookup_request_id, find_longest_cache_hit, *args, **kwargs
    )
    get_computed_blocks = manager.get_computed_blocks

    def get_computed_blocks_of(request):
        coordinator.lookup_request_id = request.request_id
        try:
            return get_computed_blocks(request)
        finally:
            coordinator.lookup_request_id = None

    manager.get_computed_blocks = get_computed_blocks_of


class PlacementAllocation:
    """The scheduler's side of allocation by placement: which groups each request holds blocks in."""

    def __init__(self, scheduler, serving: ServingPlacements) -> None:
        self.serving = serving
        manager = scheduler.kv_cache_manager
        self.coordinator = manager.coordinator
        groups = scheduler.kv_cache_config.kv_cache_groups
        self.users = group_users([group.layer_names for group in groups])
        self._views: dict[frozenset[int], RequestView] = {}
        self._placement_groups: dict[tuple[str, ...], frozenset[int]] = {}
        follow_placements(self.coordinator, manager)

    def placements_of(self, request) -> list[Placement]:
        """The placements whose caches a request holds in the pool: its own. (A speculating request's draft
        still keeps its caches outside the pool, `speculative.py`; drafting on pool pages would add the draft
        placement here.)"""
        extra_args = (request.sampling_params.extra_args or {}) if request.sampling_params is not None else {}
        return [self.serving.resolve(extra_args.get(EXTRA_ARGS_KEY))]

    def groups_for(self, placements: list[Placement]) -> frozenset[int]:
        key = tuple(p.canonical for p in placements)
        groups = self._placement_groups.get(key)
        if groups is None:
            groups = self._placement_groups[key] = groups_of(placements, self.users)
        return groups

    def view(self, groups: frozenset[int]) -> RequestView:
        view = self._views.get(groups)
        if view is None:
            managers = tuple(
                manager if index in groups else UnusedGroup(manager)
                for index, manager in enumerate(self.coordinator.single_type_managers)
            )
            spec_groups = getattr(self.coordinator, "attention_groups", None)
            restricted = None
            if spec_groups is not None:
                restricted = [
                    spec_group._replace(group_ids=[g for g in spec_group.group_ids if g in groups])
                    for spec_group in spec_groups
                    if any(g in groups for g in spec_group.group_ids)
                ]
            own = tuple(sorted(groups))
            view = self._views[groups] = RequestView(groups, managers, restricted, own,
                                                     tuple(managers[g] for g in own))  # fmt: skip
        return view

    def check_default_fits(self, vllm_config) -> None:
        """Refuse to start when one request of the default placement at `max_model_len` cannot fit the pool."""
        config = self.coordinator.kv_cache_config
        reason = default_does_not_fit(vllm_config, [{g.layer_names[0]: g.kv_cache_spec for g in config.kv_cache_groups}],
                                      num_pages=config.num_blocks - 1)  # fmt: skip
        if reason is not None:
            raise ValueError(reason)

    def add(self, request) -> None:
        self.coordinator.placement_views[request.request_id] = self.view(self.groups_for(self.placements_of(request)))

    def remove(self, request) -> None:
        self.coordinator.placement_views.pop(request.request_id, None)


LAYOUT_OVERRIDE_KEY = "supernet_cache_layout"  # hf_overrides: "per_mixer" (default) or "per_kind" (vLLM's own)
LAYOUTS = ("per_mixer", "per_kind")


def allocates_by_placement(model_config) -> bool:
    """Whether this is a supernet deployment that lays its cache out per (layer, mixer) and allocates by
    placement (the default), rather than any other model or a supernet that keeps vLLM's own grouping, one
    group per mixer kind held by every request (`per_kind`: what this plugin did before, kept to measure
    against)."""
    hf_config = getattr(model_config, "hf_config", None)
    if getattr(hf_config, "model_type", None) != MODEL_TYPE:
        return False
    layout = getattr(hf_config, LAYOUT_OVERRIDE_KEY, None) or "per_mixer"
    if layout not in LAYOUTS:
        raise ValueError(f"{LAYOUT_OVERRIDE_KEY} = {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return layout == "per_mixer"
