"""Stage 3: cross-examination trigger inversion.

We look for an input transformation that sends the *suspect* to a target class while the
*witness* (the other provider's model of the same task) keeps the true label. A backdoor
lives in one model only, so such a transformation exists with a tiny footprint for a
backdoored suspect; for a clean suspect only larger, model-specific adversarial ones do.

Three trigger families, because backdoors are not all patches:
- `patch`: mask and pattern, x' = (1 - m) x + m p (BadNets-like, Neural Cleanse's family);
- `blend`: a universal additive signal, x' = x + d (blended keys, sinusoids, frequency
  patterns all act additively);
- `warp`: a smooth displacement field (WaNet-like geometric triggers).
An input-specific trigger (input-aware backdoors) is none of these: a per-target
generator of masks and patterns was measured and dropped, since on clean Fashion-MNIST
pairs it found input-specific adversarial triggers that scored like backdoors, at twice
the search's cost (`docs/limits.md`).

The loss, per target, is `attack_loss + witness_loss + alignment_weight * alignment_loss +
size_weight * size`.

The search spends its budget where the evidence is (`cross_invert`). Each family first
*screens* every target with each model alone, as Neural Cleanse would, at half the cost
of a cross-examined step (one model per step instead of two), and ranks the targets by
what the suspect gains over its peer: a natural shortcut is cheap in both models, a
planted key in one. Only the best few targets per direction are then cross-examined,
warm-started from the screen. A screen may prune only what it does not lose: the
detection benchmark measures, on its backdoored models, whether each planted target was
cross-examined ("Screens" in docs/benchmarks.md).

The patch family is searched for its smallest trigger per target (`minimal_patches`): a
clean Fashion-MNIST CNN turns anything into "bag" with a patch smaller than a 3x3 BadNets
key, so one target's size says little on its own. What marks a backdoor is a target far
cheaper than the model's *other* targets, and cheaper than the same target is for the
peer. So the screen finds every target's minimal patch on each model alone, each model's
footprints are read against their median over targets (`Trigger.scale`), and successive
halving rounds (`InversionConfig.rounds`) cross-examine the most economical targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.method.adam import Adam
from crossaudit.method.cka import minibatch_cka
from crossaudit.method.features import pooled
from crossaudit.method.parallel import side_by_side

DEFAULT_FAMILIES = ("patch", "blend", "warp")


@dataclass(frozen=True)
class InversionConfig:
    families: tuple[str, ...] = DEFAULT_FAMILIES
    # Blend and warp: a screen of every target, each model alone, for `search_steps`; then
    # the `keep_targets` best per direction cross-examined for `refine_steps`. Batches
    # hold `screen_batch` samples per target in every screen, `search_batch` in the patch
    # family's cross-examined rounds, `refine_batch` in blend's and warp's.
    search_steps: int = 20
    refine_steps: int = 40
    screen_batch: int = 8
    search_batch: int = 12
    refine_batch: int = 20
    keep_targets: int = 1
    lr: float = 0.1
    witness_weight: float = 1.0
    alignment_weight: float = 0.5
    use_witness: bool = True
    use_alignment: bool = True
    # The patch family's minimal-trigger search (`minimal_patches`): Neural Cleanse's
    # schedule (the size weight raised 1.5x while a trigger reaches `minimal_success`,
    # lowered 1.84x otherwise, every `check_every` steps). A screen of every target, each
    # model alone, for `screen_steps`; then successive halving, one round per
    # (targets kept per direction, steps) in `rounds` (`_minimal_patch_triggers`).
    screen_steps: int = 60
    rounds: tuple[tuple[int, int], ...] = ((2, 40), (1, 50))
    # Whether the screens run each model alone (`alone`). Without it a screen is a full
    # cross-examination of every target (`exhaustive`).
    screen_alone: bool = True
    minimal_success: float = 0.9
    check_every: int = 10
    check_per_target: int = 20

    def __post_init__(self) -> None:
        if any(keep < 1 or steps < 1 for keep, steps in self.rounds):
            raise ValueError(f"each round of the patch search keeps targets for steps, got {self.rounds}")
        if self.screen_alone and not self.rounds:
            raise ValueError("a screen of each model alone must be followed by cross-examined rounds")


class TriggerFamily(nn.Module):
    """Parameters for several targets' triggers at once; `forward(x, which)` stamps trigger `which`."""

    size_weight: float

    def footprint(self, which: Tensor) -> Tensor:
        """Per-sample size of the trigger just stamped, as a fraction of the image."""
        raise NotImplementedError


class PatchTrigger(TriggerFamily):
    size_weight = 15.0
    raise_weight = 1.5
    lower_weight = 1.5**1.5

    def __init__(self, targets: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        c, h, w = shape
        self.mask_logit = nn.Parameter(torch.full((targets, 1, h, w), -3.0))
        self.pattern_logit = nn.Parameter(torch.zeros(targets, c, h, w))

    def forward(self, x: Tensor, which: Tensor) -> Tensor:
        mask = torch.sigmoid(self.mask_logit)[which]
        return (1 - mask) * x + mask * torch.sigmoid(self.pattern_logit)[which]

    def footprint(self, which: Tensor) -> Tensor:
        return torch.sigmoid(self.mask_logit).flatten(1).mean(1)[which]


class BlendTrigger(TriggerFamily):
    size_weight = 8.0
    bound = 0.3

    def __init__(self, targets: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.delta_raw = nn.Parameter(torch.zeros(targets, *shape))

    def delta(self) -> Tensor:
        return self.bound * torch.tanh(self.delta_raw)

    def forward(self, x: Tensor, which: Tensor) -> Tensor:
        return torch.clamp(x + self.delta()[which], 0.0, 1.0)

    def footprint(self, which: Tensor) -> Tensor:
        return self.delta().abs().flatten(1).mean(1)[which]


class WarpTrigger(TriggerFamily):
    """A displacement field in pixels (channel 0 along x, 1 along y), interpolated from a
    coarse grid of control points so that it stays smooth; images need not be square."""

    size_weight = 10.0
    control_points = 4
    max_pixels = 2.0

    def __init__(self, targets: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.height, self.width = shape[-2], shape[-1]
        k = self.control_points
        self.flow_raw = nn.Parameter(0.01 * torch.randn(targets, 2, k, k))

    def flow_pixels(self) -> Tensor:
        coarse = self.max_pixels * torch.tanh(self.flow_raw)
        return F.interpolate(coarse, size=(self.height, self.width), mode="bicubic", align_corners=True)

    def _sides(self, device: torch.device) -> Tensor:
        """Image side along each flow channel (x: width, y: height)."""
        return torch.tensor([self.width, self.height], dtype=torch.float32, device=device).view(1, 2, 1, 1)

    def forward(self, x: Tensor, which: Tensor) -> Tensor:
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(-1, 1, self.height, device=x.device),
            torch.linspace(-1, 1, self.width, device=x.device),
            indexing="ij",
        )
        identity = torch.stack((grid_x, grid_y), dim=-1)
        offset = (self.flow_pixels()[which] * 2 / (self._sides(x.device) - 1)).permute(0, 2, 3, 1)
        return F.grid_sample(x, identity + offset, align_corners=True, padding_mode="border")

    def footprint(self, which: Tensor) -> Tensor:
        """Mean displacement as a fraction of the image side it runs along."""
        flow = self.flow_pixels()
        return (flow.abs() / self._sides(flow.device)).flatten(1).mean(1)[which]


FAMILY_CLASSES: dict[str, type[TriggerFamily]] = {
    "patch": PatchTrigger,
    "blend": BlendTrigger,
    "warp": WarpTrigger,
}


@dataclass
class Trigger:
    """One recovered trigger: a family's parameters, used for one target."""

    family_name: str
    target: int
    family: TriggerFamily
    footprint: float
    pixels: int
    # What this model's footprints are read against: for the patch family the median,
    # over all targets, of its minimal footprints in the screen (each model alone, a short
    # search: the same for every model, so a model's scale is comparable to its peer's);
    # None for the others, whose footprints are read as they are.
    scale: float | None = None

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        which = torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
        return self.family(x, which)

    @property
    def mask_l1(self) -> float:
        """Footprint in pixel units: pixels covered (patch), L1 of the additive
        change (blend), or summed displacement in pixels (warp)."""
        return self.footprint * self.pixels


@dataclass
class Models:
    """The two parties of a cross-examination and their aligned layer."""

    suspect: nn.Module
    witness: nn.Module
    suspect_tap: str
    witness_tap: str


@dataclass
class Examination:
    """What the cross-examination found: per direction, one trigger per (family, target
    kept), and per family the screen's merit of every target for each direction (what
    chose the targets kept, so that a screen's recall can be measured)."""

    triggers: list[list[Trigger]]
    screens: dict[str, list[np.ndarray]]


@dataclass(frozen=True)
class BatchPlan:
    """Every step's batch of an optimisation, as sample indices drawn before it runs.

    Why drawn up front: the two directions' optimisations run at the same time
    (`parallel.side_by_side`), and each must still see the batches a one-after-the-other run
    draws from the shared generator, so that an audit's findings do not depend on how its
    work was scheduled. Each batch holds `per_target` samples not of each active target's
    class, stacked target by target; a minimal-patch search also draws one fixed check batch.
    """

    active: list[int]
    steps: np.ndarray
    check: np.ndarray | None = None

    @classmethod
    def draw(
        cls, labels: np.ndarray, active: list[int], per_target: int, steps: int,
        rng: np.random.RandomState, check_per_target: int = 0,
    ) -> BatchPlan:  # fmt: skip
        check = _draw(labels, active, check_per_target, rng) if check_per_target else None
        return cls(active, np.stack([_draw(labels, active, per_target, rng) for _ in range(steps)]), check)

    def batch(self, data: tuple[Tensor, Tensor], indices: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        x, y = data
        chosen = torch.from_numpy(indices).to(x.device)
        which = torch.tensor(self.active, device=x.device).repeat_interleave(len(indices) // len(self.active))
        return x[chosen], y[chosen], which


def _draw(labels: np.ndarray, active: list[int], per_target: int, rng: np.random.RandomState) -> np.ndarray:
    chosen = []
    for target in active:
        pool = np.flatnonzero(labels != target)
        chosen.append(rng.choice(pool, per_target, replace=len(pool) < per_target))
    return np.concatenate(chosen)


def _losses(
    family: TriggerFamily,
    models: Models,
    config: InversionConfig,
    batch: tuple[Tensor, ...],
    size_weight: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-target loss, and per-target merit (success rate minus the size penalty).

    Family index == target class, so `which` is also the suspect's goal label. The size
    weight is the family's, or one per target (`minimal_patches`).
    """
    x, y, which = batch
    groups = len(torch.unique(which))
    size_weight = family.size_weight if size_weight is None else size_weight
    triggered = family(x, which)
    s_logits, s_feat = models.suspect.forward_tapped(triggered, [models.suspect_tap])
    w_logits, w_feat = None, {}
    if config.use_witness or config.use_alignment:  # a screen (`alone`) runs the suspect only
        w_logits, w_feat = models.witness.forward_tapped(triggered, [models.witness_tap])
    attack_loss = F.cross_entropy(s_logits, which, reduction="none").view(groups, -1).mean(1)
    size = family.footprint(which).view(groups, -1).mean(1)
    loss = attack_loss + size_weight * size
    if config.use_witness and w_logits is not None:
        witness_loss = F.cross_entropy(w_logits, y, reduction="none").view(groups, -1).mean(1)
        loss = loss + config.witness_weight * witness_loss
    if config.use_alignment:
        s_vec = pooled(s_feat[models.suspect_tap])
        w_vec = pooled(w_feat[models.witness_tap])
        alignment_loss = minibatch_cka(s_vec.view(groups, -1, s_vec.shape[1]), w_vec.view(groups, -1, w_vec.shape[1]))
        loss = loss + config.alignment_weight * alignment_loss.to(loss.dtype)
    success = _success_rate(s_logits, w_logits if config.use_witness else None, y, which, groups)
    return loss, success - size_weight * size.detach()


def _success_rate(s_logits: Tensor, w_logits: Tensor | None, y: Tensor, which: Tensor, groups: int) -> Tensor:
    """Per target: the share of its samples the suspect sends to the target while the
    witness (when it takes part) keeps the true label."""
    hit = s_logits.argmax(1) == which
    if w_logits is not None:
        hit = hit & (w_logits.argmax(1) == y)
    return hit.float().view(groups, -1).mean(1)


def _optimise(
    family: TriggerFamily, models: Models, data: tuple[Tensor, Tensor], plan: BatchPlan, config: InversionConfig
) -> np.ndarray:
    """Adam on the plan's active targets' triggers; returns each one's smoothed merit."""
    optimiser = Adam(family.parameters(), lr=config.lr)
    merit = np.zeros(len(plan.active))
    for indices in plan.steps:
        loss, success = _losses(family, models, config, plan.batch(data, indices))
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
        merit = 0.7 * merit + 0.3 * success.detach().cpu().numpy()
    return merit


def _each_direction(
    search: Callable[..., np.ndarray], families: Sequence[TriggerFamily | MinimalSearch], directions: list[Models],
    data: tuple[Tensor, Tensor], plans: list[BatchPlan], config: InversionConfig,
) -> list[np.ndarray]:  # fmt: skip
    """`search` (`_optimise` on a family, or `minimal_patches` on a `MinimalSearch`) for
    every direction, side by side (`parallel.side_by_side`): a small model's step cannot
    keep two cores busy, and each direction's batches are drawn before either runs, so the
    findings are bitwise those of one direction after the other (`BatchPlan`;
    `tests/test_inversion.py`)."""
    jobs = zip(families, directions, plans, strict=True)
    return side_by_side([partial(search, family, models, data, plan, config) for family, models, plan in jobs])


@torch.no_grad()
def _success(family: TriggerFamily, models: Models, config: InversionConfig, batch: tuple[Tensor, ...]) -> Tensor:
    """Per target: the fraction of the batch sent to the target with the witness kept."""
    x, y, which = batch
    triggered = family(x, which)
    witness = models.witness(triggered) if config.use_witness else None
    return _success_rate(models.suspect(triggered), witness, y, which, len(torch.unique(which)))


@dataclass
class MinimalSearch:
    """A patch family's minimal-trigger search, carried from round to round: each target's
    size weight (Neural Cleanse's schedule) and smallest footprint that reached
    `minimal_success` (1, the whole image, until one does). A round starts from the
    weights and the patches the last one ended with, so no round repeats another's work."""

    family: PatchTrigger
    weight: Tensor
    smallest: np.ndarray

    @classmethod
    def start(cls, targets: int, shape: tuple[int, ...], device: torch.device) -> MinimalSearch:
        family = PatchTrigger(targets, tuple(shape)).to(device)  # type: ignore[arg-type]
        return cls(family, torch.full((targets,), family.size_weight, device=device), np.ones(targets))


def minimal_patches(
    search: MinimalSearch,
    models: Models,
    data: tuple[Tensor, Tensor],
    plan: BatchPlan,
    config: InversionConfig,
) -> np.ndarray:
    """The plan's active targets' smallest patches that send `minimal_success` of a fixed
    check batch to the target (with the witness kept, when it takes part), as a fraction
    of the image; returns every target's smallest so far. The family is left holding those
    patches, or the last one tried where none succeeded.

    Each target's size weight follows Neural Cleanse's schedule, so the mask shrinks while
    the trigger works and grows back when it stops working; the check batch, not the
    training batch, decides both, so the smallest is not a lucky draw. Targets outside the
    plan get no gradient and keep their patches (a fresh Adam moves nothing without one).
    """
    family = search.family
    active = torch.tensor(plan.active, device=data[0].device)
    check = plan.batch(data, plan.check)
    weight = search.weight[active]
    kept = [p.detach().clone() for p in family.parameters()]
    optimiser = Adam(family.parameters(), lr=config.lr)
    for step, indices in enumerate(plan.steps, start=1):
        loss, _ = _losses(family, models, config, plan.batch(data, indices), weight)
        optimiser.zero_grad()
        loss.sum().backward()
        optimiser.step()
        if step % config.check_every:
            continue
        reached = _success(family, models, config, check) >= config.minimal_success
        with torch.no_grad():
            size = family.footprint(active)
            better = reached & (size < torch.from_numpy(search.smallest).to(size)[active])
            for saved, live in zip(kept, family.parameters(), strict=True):
                saved[active[better]] = live[active[better]]
        search.smallest[plan.active] = np.where(better.cpu().numpy(), size.cpu().numpy(), search.smallest[plan.active])
        weight = torch.where(reached, weight * family.raise_weight, weight / family.lower_weight)
    search.weight[active] = weight
    reached_any = torch.from_numpy(search.smallest < 1.0).to(data[0].device)
    with torch.no_grad():
        for saved, live in zip(kept, family.parameters(), strict=True):
            live[reached_any] = saved[reached_any]
    return search.smallest.copy()


def minimal_plan(
    labels: np.ndarray, active: list[int], steps: int, per_target: int, config: InversionConfig,
    rng: np.random.RandomState,
) -> BatchPlan:  # fmt: skip
    """The batches of one `minimal_patches` round on `active` targets."""
    return BatchPlan.draw(labels, active, per_target, steps, rng, config.check_per_target)


def alone(config: InversionConfig) -> InversionConfig:
    """The screens' configuration: the suspect alone, with neither the witness nor the CKA
    term, so that a step runs one model instead of two (unless the config asks for a full
    cross-examination of every target, `exhaustive`)."""
    return replace(config, use_witness=False, use_alignment=False) if config.screen_alone else config


def exhaustive(config: InversionConfig, search_steps: int = 30) -> InversionConfig:
    """Every target cross-examined in full, nothing screened: the patch family's minimal
    patches for 400 steps with both models, blend and warp searched with both models
    before one target per direction is refined for 90 steps.

    Why: a short screen of an encoder's prototype head or a semi-supervised model flips
    too few targets for its median to mean anything (on the test zoo's self-supervised
    BadNets CNN more than half its targets never reached the screen's success rate, and
    the backdoored semi- and self-supervised CNNs passed). These paradigms keep the full
    search their profiles were calibrated with, at about three times the cost.
    """
    return replace(
        config, screen_alone=False, screen_steps=400, screen_batch=12, rounds=(),
        search_steps=search_steps, refine_steps=90, refine_batch=40,
    )  # fmt: skip


def ranked(merit: np.ndarray, among: list[int]) -> list[int]:
    """`among` in the order a screen keeps targets: highest merit first, ties to the lower class."""
    return sorted(among, key=lambda target: -merit[target])


def most_economical(merits: list[np.ndarray], among: list[int], per_direction: int) -> list[int]:
    """The union over directions of each direction's `per_direction` targets, of `among`,
    with the highest merit; each direction's merit is already read against its peer."""
    keep: set[int] = set()
    for merit in merits:
        keep.update(ranked(merit, among)[:per_direction])
    return sorted(keep)


def patch_economy(smallest: list[np.ndarray], scales: list[float]) -> list[np.ndarray]:
    """Per direction, how much cheaper each target's patch is for the suspect than for its
    peer, each read against its model's median (`scales`): a target far cheaper than the
    model's others *and* than the same target for the peer. The peer's cost counts no
    higher than its median, as in `verdict.Finding.score`."""
    relative = [np.log10(s / scale) for s, scale in zip(smallest, scales, strict=True)]
    return [np.minimum(relative[1 - index], 0.0) - relative[index] for index in range(len(relative))]


def _minimal_patch_triggers(
    directions: list[Models],
    data: tuple[Tensor, Tensor],
    num_classes: int,
    config: InversionConfig,
    rng: np.random.RandomState,
) -> tuple[list[list[Trigger]], list[np.ndarray]]:
    """Per direction, patch triggers for the targets most out of line with the model's
    other targets *and* with the peer, found by successive halving.

    The screen finds every target's minimal patch on each model alone, for `screen_steps`:
    Neural Cleanse's search at half the cost of a cross-examined step, and each model's
    median over targets is the scale its footprints are read against. Each of `rounds`
    then keeps each direction's most economical targets (`patch_economy`) and
    cross-examines only those, warm-started from the last round: their footprints are the
    smallest patches that flip the suspect *with the witness kept*, so a natural shortcut,
    which moves the peer too, costs more here than in the screen, and a planted key does not.
    Also returns the screen's economy of every target, per direction.
    """
    shape = tuple(data[0].shape[1:])
    searches = [MinimalSearch.start(num_classes, shape, data[0].device) for _ in directions]
    labels = data[1].cpu().numpy()
    keep = list(range(num_classes))
    plans = [minimal_plan(labels, keep, config.screen_steps, config.screen_batch, config, rng) for _ in directions]
    smallest = _each_direction(minimal_patches, searches, directions, data, plans, alone(config))
    scales = [float(np.median(s)) for s in smallest]
    screen = patch_economy(smallest, scales)
    if not config.rounds:  # an exhaustive search: its footprints are the screen's own
        keep = most_economical(screen, keep, config.keep_targets)
    else:
        for search in searches:
            search.smallest[:] = 1.0  # the cross-examined rounds find their own smallest
    for per_direction, steps in config.rounds:
        keep = most_economical(patch_economy(smallest, scales), keep, per_direction)
        plans = [minimal_plan(labels, keep, steps, config.search_batch, config, rng) for _ in directions]
        smallest = _each_direction(minimal_patches, searches, directions, data, plans, config)
    pixels = int(shape[-1] * shape[-2])
    for search in searches:
        search.family.requires_grad_(False)
    triggers = [
        [Trigger("patch", t, search.family, float(search.smallest[t]), pixels, scale) for t in keep]
        for search, scale in zip(searches, scales, strict=True)
    ]
    return triggers, screen


def _differential(merits: list[np.ndarray]) -> list[np.ndarray]:
    """Each direction's merit less its peer's: what the suspect alone gains from a target."""
    return [merits[index] - merits[1 - index] for index in range(len(merits))]


def cross_invert(
    directions: list[Models],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    config: InversionConfig,
    seed: int,
) -> Examination:
    """Triggers for both directions of the cross-examination, on the *same* targets.

    Per family: a screen on every target with each model alone (`alone`) ranks the targets
    by what the suspect gains over its peer; the union of each direction's `keep_targets`
    best is cross-examined in every direction, so each candidate target ends with a
    trigger against both models and their footprints can be compared. The patch family
    is searched for its minimal triggers instead (`_minimal_patch_triggers`).
    """
    rng = np.random.RandomState(seed)
    torch.manual_seed(seed)
    shape = tuple(x.shape[1:])
    labels = y.cpu().numpy()
    everyone = list(range(num_classes))
    found = Examination([[] for _ in directions], {})
    for name in config.families:
        if name == "patch":
            patches, found.screens[name] = _minimal_patch_triggers(directions, (x, y), num_classes, config, rng)
            for mine, theirs in zip(found.triggers, patches, strict=True):
                mine.extend(theirs)
            continue
        families = [FAMILY_CLASSES[name](num_classes, shape).to(x.device) for _ in directions]
        plans = [BatchPlan.draw(labels, everyone, config.screen_batch, config.search_steps, rng) for _ in directions]
        merits = _each_direction(_optimise, families, directions, (x, y), plans, alone(config))
        # A screen of each model alone is read against the peer; a cross-examined one already was.
        found.screens[name] = _differential(merits) if config.screen_alone else merits
        keep = most_economical(found.screens[name], everyone, config.keep_targets)
        plans = [BatchPlan.draw(labels, keep, config.refine_batch, config.refine_steps, rng) for _ in directions]
        _each_direction(_optimise, families, directions, (x, y), plans, config)
        for index, family in enumerate(families):
            family.requires_grad_(False)
            for target in keep:
                which = torch.full((min(len(x), 256),), target, dtype=torch.long, device=x.device)
                with torch.no_grad():
                    family(x[: len(which)], which)
                    footprint = float(family.footprint(which).mean())
                found.triggers[index].append(Trigger(name, target, family, footprint, int(shape[-1] * shape[-2])))
    return found
