"""Vectorised relativistic kinematics for generating physics that can be checked.

Everything works on whole numpy arrays of particles at once (no Python loop over events), so
that generating millions of events for a benchmark takes seconds, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z_MASS = 91.1876
Z_WIDTH = 2.4952
W_MASS = 80.377
W_WIDTH = 2.085
TOP_MASS = 172.5
TOP_WIDTH = 1.42
MUON_MASS = 0.1056584
ELECTRON_MASS = 0.000511
B_MASS = 4.78


@dataclass
class FourVectors:
    """Cartesian four-momenta of N particles."""

    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray

    @property
    def pt(self) -> np.ndarray:
        return np.hypot(self.px, self.py)

    @property
    def p(self) -> np.ndarray:
        return np.sqrt(self.px**2 + self.py**2 + self.pz**2)

    @property
    def eta(self) -> np.ndarray:
        pt = np.maximum(self.pt, 1e-9)
        return np.arcsinh(self.pz / pt)

    @property
    def phi(self) -> np.ndarray:
        return np.arctan2(self.py, self.px)

    @property
    def mass(self) -> np.ndarray:
        m2 = self.e**2 - self.px**2 - self.py**2 - self.pz**2
        return np.sqrt(np.maximum(m2, 0.0))

    @classmethod
    def from_pt_eta_phi_m(
        cls, pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, m: np.ndarray
    ) -> FourVectors:
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        return cls(px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + m**2))

    @classmethod
    def from_pt_y_phi_m(
        cls, pt: np.ndarray, rapidity: np.ndarray, phi: np.ndarray, m: np.ndarray
    ) -> FourVectors:
        mt = np.sqrt(pt**2 + m**2)
        return cls(pt * np.cos(phi), pt * np.sin(phi), mt * np.sinh(rapidity), mt * np.cosh(rapidity))


def breit_wigner(rng: np.random.Generator, mass: float, width: float, n: int, low: float,
                 high: float) -> np.ndarray:
    """Relativistic-enough (Cauchy) line shape, truncated to [low, high] by inverse CDF."""
    cdf_low = np.arctan(2 * (low - mass) / width)
    cdf_high = np.arctan(2 * (high - mass) / width)
    return mass + 0.5 * width * np.tan(rng.uniform(cdf_low, cdf_high, n))


def falling_spectrum(rng: np.random.Generator, low: float, high: float, slope: float,
                     n: int) -> np.ndarray:
    """Exponentially falling continuum between low and high (inverse CDF)."""
    u = rng.uniform(0.0, 1.0, n)
    span = 1.0 - np.exp(-(high - low) / slope)
    return low - slope * np.log(1.0 - u * span)


def boost(v: FourVectors, parent: FourVectors) -> FourVectors:
    """Boost momenta given in the parent's rest frame into the frame where the parent moves."""
    bx, by, bz = parent.px / parent.e, parent.py / parent.e, parent.pz / parent.e
    b2 = np.maximum(bx**2 + by**2 + bz**2, 1e-18)
    gamma = 1.0 / np.sqrt(1.0 - np.minimum(b2, 1 - 1e-15))
    bp = bx * v.px + by * v.py + bz * v.pz
    coef = (gamma - 1.0) * bp / b2 + gamma * v.e
    return FourVectors(v.px + coef * bx, v.py + coef * by, v.pz + coef * bz, gamma * (v.e + bp))


def two_body_decay(rng: np.random.Generator, parent: FourVectors, m1: np.ndarray | float,
                   m2: np.ndarray | float) -> tuple[FourVectors, FourVectors]:
    """Isotropic two-body decay in the parent's rest frame, boosted to the lab."""
    big_m = parent.mass
    n = big_m.shape[0]
    m1 = np.broadcast_to(np.asarray(m1, dtype=float), (n,))
    m2 = np.broadcast_to(np.asarray(m2, dtype=float), (n,))
    term = (big_m**2 - (m1 + m2) ** 2) * (big_m**2 - (m1 - m2) ** 2)
    p_star = np.sqrt(np.maximum(term, 0.0)) / (2.0 * big_m)
    cos_theta = rng.uniform(-1.0, 1.0, n)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    phi = rng.uniform(-np.pi, np.pi, n)
    px, py, pz = p_star * sin_theta * np.cos(phi), p_star * sin_theta * np.sin(phi), p_star * cos_theta
    d1 = FourVectors(px, py, pz, np.sqrt(p_star**2 + m1**2))
    d2 = FourVectors(-px, -py, -pz, np.sqrt(p_star**2 + m2**2))
    return boost(d1, parent), boost(d2, parent)


def produce(rng: np.random.Generator, mass: np.ndarray, mean_pt: float,
            rapidity_sigma: float) -> FourVectors:
    """A resonance with an exponential transverse momentum and a Gaussian rapidity."""
    n = mass.shape[0]
    pt = np.asarray(rng.exponential(mean_pt, n))
    rapidity = np.asarray(rng.normal(0.0, rapidity_sigma, n))
    phi = np.asarray(rng.uniform(-np.pi, np.pi, n))
    return FourVectors.from_pt_y_phi_m(pt, rapidity, phi, mass)


def smear_pt(rng: np.random.Generator, pt: np.ndarray, relative: float) -> np.ndarray:
    """Detector resolution: Gaussian relative smearing, kept positive."""
    return np.abs(pt * (1.0 + relative * rng.standard_normal(pt.shape[0])))
