"""AdaRound (Nagel et al., 2020) on one layer: learn whether each weight rounds up or down.

A layer here is ``G`` groups of ``O`` output channels, each a dot product
over ``K`` inputs (a Conv's patch, a Gemm's row). The objective is the
layer's output error on calibration data with its *quantized* inputs
``x~`` (what the quantized model feeds it) against the float layer on its
float inputs ``x``: ``E || W x - W~ x~ ||^2``. It is a quadratic form in
``W~``, so the data enter only through three moment matrices per group,
``E[x~ x~^T]``, ``E[x~ x^T]`` and ``E[x x^T]`` (`LayerMoments`): memory is
``K x K`` per group however many samples stream through, and every
optimisation step sees all of them exactly.

With ``refit_bias`` the moments are centred and each channel's bias is then
solved in closed form (mean matching on the quantized inputs): AdaQuant's
bias tuning without its optimiser. ``refit_scale`` also solves each
channel's scale for the chosen integers, again in closed form.

The rounding itself follows the paper: ``W~ = s * (floor(W / s) + h(V))``
with the rectified sigmoid ``h``, Adam on ``V``, and the regulariser
``1 - |2h - 1|^beta`` with ``beta`` annealed from 20 to 2 after a warm-up.
A few greedy passes then flip single roundings wherever the exact objective
falls. The result is kept only if it beats rounding to nearest.

numpy, not torch: the gradient is one matrix product, and importing torch
alone costs more memory (186 MB) than onnxruntime's whole quantizer
peaks at on EfficientNet-Lite0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 at finite V
FLUSH_ELEMENTS = 2**21  # buffered input values per side before `LayerMoments` multiplies them out


@dataclass(frozen=True)
class RoundingSettings:
    """How one layer's rounding is optimised."""

    iterations: int = 200
    regularization: float = 1.0  # weight of the rounding regulariser, the objective scaled to 1 at nearest
    learning_rate: float = 0.1
    beta: tuple[float, float] = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
    warmup: float = 0.2  # share of the iterations without the regulariser
    flip_passes: int = 2  # greedy passes over the weights afterwards, flipping a rounding where the error falls
    refit_bias: bool = True
    refit_scale: bool = False


class LayerMoments:
    """Running second moments of a layer's paired inputs, per group (float64 sums of float32 products)."""

    __slots__ = ("f_sum", "ff", "pending", "q_sum", "qf", "qq", "rows")

    def __init__(self, groups: int, fan_in: int) -> None:
        self.rows = 0
        self.qq, self.qf, self.ff = (np.zeros((groups, fan_in, fan_in)) for _ in range(3))
        self.q_sum, self.f_sum = np.zeros((groups, fan_in)), np.zeros((groups, fan_in))
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []

    def update(self, quantized: np.ndarray, reference: np.ndarray) -> None:
        """Add rows ``[G, P, K]`` of the quantized model's inputs and the float model's, paired row by row.

        Rows wait until `FLUSH_ELEMENTS` are buffered: few large products run much faster than many small ones.
        """
        self.pending.append((quantized, reference))
        if sum(q.size for q, _ in self.pending) >= FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        quantized = np.concatenate([q for q, _ in self.pending], axis=1)
        reference = np.concatenate([f for _, f in self.pending], axis=1)
        self.pending = []
        q_t = quantized.transpose(0, 2, 1)
        self.qq += q_t @ quantized
        self.qf += q_t @ reference
        self.ff += reference.transpose(0, 2, 1) @ reference
        self.q_sum += quantized.sum(axis=1, dtype=np.float64)
        self.f_sum += reference.sum(axis=1, dtype=np.float64)
        self.rows += quantized.shape[1]

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        return self.q_sum / self.rows, self.f_sum / self.rows

    def quadratic(self, centered: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``E[x~ x~^T]``, ``E[x~ x^T]``, ``E[x x^T]``, centred (covariances) when ``centered``."""
        self.flush()
        qq, qf, ff = self.qq / self.rows, self.qf / self.rows, self.ff / self.rows
        if centered:
            q_mean, f_mean = self.means()
            qq = qq - q_mean[:, :, None] * q_mean[:, None, :]
            qf = qf - q_mean[:, :, None] * f_mean[:, None, :]
            ff = ff - f_mean[:, :, None] * f_mean[:, None, :]
        return qq, qf, ff


@dataclass(frozen=True)
class LayerProblem:
    """One layer's float weight ``[G, O, K]``, its quantization grid (scale and zero ``[G, O]``) and limits."""

    weight: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    shared_scale: bool = False  # one scale for the whole tensor: ``refit_scale`` leaves it alone

    def nearest(self) -> np.ndarray:
        """The integers rounding to nearest gives (zero point included)."""
        q = np.round(self.weight / self.scale[..., None]) + self.zero[..., None]
        return np.clip(q, self.qmin, self.qmax)


@dataclass(frozen=True)
class LayerRounding:
    """The chosen integers ``[G, O, K]``, scales ``[G, O]``, the bias change, and the error before and after.

    ``bias_shift`` (``[G * O]``, None without ``refit_bias``) is subtracted from
    the bias, as bias correction's shift is. ``sqnr_*_db`` are the layer's
    output SQNR on the calibration data, nearest rounding and the result.
    """

    q: np.ndarray
    scale: np.ndarray
    bias_shift: np.ndarray | None
    sqnr_nearest_db: float
    sqnr_db: float
    outcome: str  # "adaround", or why rounding to nearest was kept


class _Objective:
    """``E || W x - W~ x~ ||^2`` summed over output channels, as a function of the weight error ``D = W~ - W``.

    Written in ``D`` (small beside ``W``) so float32 keeps the error's precision:
    ``L = K0 + 2 <D, W A - W B^T> + <D, D A>`` with ``A = E[x~ x~^T]``, ``B = E[x~ x^T]``.
    Its gradient is ``2 (W A - W B^T + D A)``: one product ``D A`` gives both.
    """

    def __init__(self, weight: np.ndarray, moments: LayerMoments, centered: bool) -> None:
        qq, qf, ff = moments.quadratic(centered)
        w = weight.astype(np.float64)
        self.qq64, self.linear64 = qq, w @ qq - w @ qf.transpose(0, 2, 1)
        self.qq, self.linear = qq.astype(np.float32), self.linear64.astype(np.float32)
        self.constant = float(np.sum(w * (w @ (qq - qf - qf.transpose(0, 2, 1) + ff))))
        self.signal = float(np.sum(w * (w @ moments.quadratic(False)[2])))

    def exact(self, error: np.ndarray) -> float:
        error = error.astype(np.float64)
        return self.constant + float(np.sum(error * (2 * self.linear64 + error @ self.qq64)))

    def sqnr_db(self, error: np.ndarray) -> float:
        noise = max(self.exact(error), 0.0)
        return float("inf") if noise == 0.0 else float(10 * np.log10(max(self.signal, 1e-30) / noise))


def round_layer(problem: LayerProblem, moments: LayerMoments, settings: RoundingSettings) -> LayerRounding:
    """AdaRound ``problem`` on the inputs summarised by ``moments``; nearest rounding if that is no worse."""
    weight = problem.weight.astype(np.float32)
    scale = problem.scale.astype(np.float32)[..., None]
    zero = problem.zero.astype(np.float32)[..., None]
    objective = _Objective(weight, moments, centered=settings.refit_bias)
    nearest = problem.nearest().astype(np.float32)
    nearest_error = scale * (nearest - zero) - weight
    nearest_db = objective.sqnr_db(nearest_error)
    nearest_loss = objective.exact(nearest_error)
    # Scaled so the part of the error that weight rounding causes is 1 at nearest: ``regularization`` then
    # weighs the same against it in every layer, whatever its size or the noise its inputs bring.
    norm = max(nearest_loss - objective.constant, 1e-12 * max(objective.signal, 1e-30))
    q, outcome = _optimise(weight, scale, zero, problem, objective, settings, norm)
    if outcome == "adaround" and settings.flip_passes:
        q = _flip(q, weight, scale, zero, problem, objective, settings.flip_passes)
    if outcome == "adaround" and objective.exact(scale * (q - zero) - weight) >= nearest_loss:
        outcome = "nearest: no better than rounding to nearest"
    if outcome != "adaround":
        q = nearest
    scale_out = problem.scale.astype(np.float32)
    if settings.refit_scale and not problem.shared_scale:
        scale_out = _refit_scale(weight, q - zero, scale_out, moments, settings.refit_bias)
        scale = scale_out[..., None]
    error = scale * (q - zero) - weight
    shift = _bias_shift(weight, weight + error, moments) if settings.refit_bias else None
    return LayerRounding(q, scale_out, shift, nearest_db, objective.sqnr_db(error), outcome)


def _optimise(
    weight: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    problem: LayerProblem,
    objective: _Objective,
    settings: RoundingSettings,
    norm: float,
) -> tuple[np.ndarray, str]:
    """The integers AdaRound chooses: Adam on ``V``, gradients written out, the objective scaled by ``norm``."""
    floor = np.floor(weight / scale)
    fraction = np.clip(weight / scale - floor, 1e-4, 1 - 1e-4)
    # h(V) starts at each weight's own fraction: the relaxed weight starts at the float weight.
    v = -np.log((ZETA - GAMMA) / (fraction - GAMMA) - 1).astype(np.float32)
    m, second = np.zeros_like(v), np.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    warm = int(settings.warmup * settings.iterations)
    first, last = settings.beta
    # Where the integer would leave [qmin, qmax] whether rounded up or down, the weight does not move.
    free = ((floor + zero) >= problem.qmin) & ((floor + 1 + zero) <= problem.qmax)
    for step in range(settings.iterations):
        sigmoid = 1 / (1 + np.exp(-v))
        stretched = sigmoid * (ZETA - GAMMA) + GAMMA
        h = np.clip(stretched, 0, 1)
        error = scale * (floor + h) - weight  # (floor + h + zero - zero) * scale
        error = np.where(free, error, scale * (np.clip(floor + h + zero, problem.qmin, problem.qmax) - zero) - weight)
        grad_h = (2 / norm) * (objective.linear + error @ objective.qq) * scale * free
        if step >= warm:
            beta = last + (first - last) * (1 - (step - warm) / max(settings.iterations - warm, 1))
            centred = 2 * h - 1
            grad_h -= (settings.regularization / h.size) * 2 * beta * np.abs(centred) ** (beta - 1) * np.sign(centred)
        grad = grad_h * ((ZETA - GAMMA) * sigmoid * (1 - sigmoid)) * ((stretched > 0) & (stretched < 1))
        if not np.all(np.isfinite(grad)):
            return floor, "nearest: the optimisation diverged (non-finite gradient)"
        m = beta1 * m + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        t = step + 1
        v -= settings.learning_rate * (m / (1 - beta1**t)) / (np.sqrt(second / (1 - beta2**t)) + eps)
    up = (1 / (1 + np.exp(-v))) * (ZETA - GAMMA) + GAMMA >= 0.5
    return np.clip(floor + up + zero, problem.qmin, problem.qmax).astype(np.float32), "adaround"


def _flip(
    q: np.ndarray,
    weight: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    problem: LayerProblem,
    objective: _Objective,
    passes: int,
) -> np.ndarray:
    """Greedy descent on the exact objective: flip each weight between its floor and ceiling where that helps.

    Output channels are independent terms of the objective, so every channel flips its ``k``-th
    weight at once; a pass over ``K`` weights costs about one optimisation step.
    """
    qq, linear = objective.qq64, objective.linear64
    s, z = scale.astype(np.float64)[..., 0], zero.astype(np.float64)[..., 0]
    floor = np.floor(weight / scale).astype(np.float64)  # as the optimisation's floor, in float32
    q = q.astype(np.float64)
    coupled = (s[..., None] * (q - z[..., None]) - weight) @ qq  # E A, kept up to date flip by flip
    diagonal = np.diagonal(qq, axis1=1, axis2=2)  # [G, K]
    for _ in range(passes):
        flips = 0
        for k in range(q.shape[-1]):
            current = q[:, :, k]
            other = np.clip(np.where(current - z == floor[:, :, k], current + 1, current - 1), problem.qmin,
                            problem.qmax)  # fmt: skip
            delta = s * (other - current)
            gain = delta * 2 * (linear[:, :, k] + coupled[:, :, k]) + delta**2 * diagonal[:, k, None]
            take = gain < 0
            if not take.any():
                continue
            delta = np.where(take, delta, 0.0)
            q[:, :, k] = np.where(take, other, current)
            coupled += delta[..., None] * qq[:, k, None, :]
            flips += int(take.sum())
        if not flips:
            break
    return q.astype(np.float32)


def _refit_scale(
    weight: np.ndarray, integers: np.ndarray, scale: np.ndarray, moments: LayerMoments, centered: bool
) -> np.ndarray:
    """Each channel's scale solved for its integers: ``s = q^T B w / q^T A q``, stored float16-exact.

    A channel whose solution is not positive and finite keeps its scale.
    """
    qq, qf, _ = moments.quadratic(centered)
    q = integers.astype(np.float64)
    numerator = np.sum(q * (weight.astype(np.float64) @ qf.transpose(0, 2, 1)), axis=-1)
    denominator = np.sum(q * (q @ qq), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        solved = numerator / denominator
    half = solved.astype(np.float16).astype(np.float32)
    ok = np.isfinite(solved) & (solved >= np.finfo(np.float16).tiny) & (solved < np.finfo(np.float16).max / 2)
    return np.where(ok, half, scale).astype(np.float32)


def _bias_shift(weight: np.ndarray, rounded: np.ndarray, moments: LayerMoments) -> np.ndarray:
    """``E[x~]^T w~ - E[x]^T w`` per channel: subtracted from the bias, it matches the float output's mean."""
    q_mean, f_mean = moments.means()
    rounded_mean = np.sum(rounded.astype(np.float64) * q_mean[:, None, :], axis=-1)
    float_mean = np.sum(weight.astype(np.float64) * f_mean[:, None, :], axis=-1)
    return (rounded_mean - float_mean).reshape(-1)
