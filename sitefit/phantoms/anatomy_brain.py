"""Head phantom: scalp, skull, CSF and a brain with a folded cortex, defined in millimetres.

Implicit shapes in the subject frame (x to the right, y anterior, z superior; millimetres at the
reference field of view). The skull is a perturbed ellipsoid, flatter below; the brain hull
follows the inner skull at a varying CSF gap and is split into cerebrum, cerebellum (below a
tentorial gap) and brainstem. Sulci are the zero sheets of a smooth random field, cut to a
depth below the hull; the grey-matter ribbon is everything within a cortical thickness of the
pial surface (the hull, a sulcus or the interhemispheric fissure), white matter lies beneath.
Ventricles and deep grey matter sit under the corpus callosum. Around the head: eyes, orbital
fat, a sinus, the neck with the spinal cord and vertebrae.

Labels: task ``brain`` marks everything inside the brain hull (tissue, sulcal CSF, ventricles);
task ``tissue`` marks grey matter 1 (cortex, cerebellar cortex, deep nuclei), white matter 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sitefit.phantoms.fields import (
    F32,
    U8,
    LatticeField,
    PlaneWaves,
    Pose,
    ellipse_distance,
    ellipsoid_distance,
    segment_distance,
    smooth_min,
)
from sitefit.phantoms.structures import Structure


def _s(name: str, tissue: str, brain: int, gm_wm: int, texture: float) -> Structure:
    return Structure(name, tissue, {"brain": brain, "tissue": gm_wm}, texture)


STRUCTURES: tuple[Structure, ...] = (
    _s("air", "air", 0, 0, 0.0),
    _s("skin", "skin", 0, 0, 0.05),
    _s("scalp_fat", "fat", 0, 0, 0.05),
    _s("muscle", "muscle", 0, 0, 0.06),
    _s("bone", "bone", 0, 0, 0.1),
    _s("marrow", "marrow", 0, 0, 0.08),
    _s("csf", "csf", 0, 0, 0.04),
    _s("sulcal_csf", "csf", 1, 0, 0.04),
    _s("ventricle", "csf", 1, 0, 0.04),
    _s("cortex", "gm", 1, 1, 0.05),
    _s("deep_gm", "deep_gm", 1, 1, 0.04),
    _s("white_matter", "wm", 1, 2, 0.035),
    _s("cerebellar_gm", "gm", 1, 1, 0.05),
    _s("cerebellar_wm", "wm", 1, 2, 0.04),
    _s("brainstem", "wm", 1, 2, 0.04),
    _s("cord", "wm", 0, 0, 0.04),
    _s("eye", "csf", 0, 0, 0.03),
    _s("orbital_fat", "fat", 0, 0, 0.05),
    _s("sinus", "air", 0, 0, 0.0),
)
(AIR, SKIN, SCALP_FAT, MUSCLE, BONE, MARROW, CSF, SULCAL_CSF, VENTRICLE, CORTEX, DEEP_GM, WM,
 CB_GM, CB_WM, BRAINSTEM, CORD, EYE, ORBIT_FAT, SINUS) = range(len(STRUCTURES))  # fmt: skip

SKIN_MM = 1.2
TABLE_MM = 1.1  # inner and outer tables of the skull; the diploe (marrow) lies between
TENTORIUM_MM = 1.2
FISSURE_MM = 1.6

Vec = tuple[float, float, float]


@dataclass(frozen=True, eq=False)
class BrainAnatomy:
    """One random head. Build with :meth:`random`; sample with :meth:`structure_ids`."""

    pose: Pose
    geo: dict[str, float]  # scalar dimensions in mm (see ``random``)
    skull_pert: PlaneWaves  # relative radius perturbation of the skull, on unit directions
    gap_pert: PlaneWaves  # relative CSF gap variation, on unit directions
    detail_pert: PlaneWaves  # slow variation of sulcal depth and cortical thickness (mm)
    fissure_pert: PlaneWaves  # sideways wobble of the interhemispheric fissure (mm)
    fold: LatticeField  # sulci: zero sheets of this field
    folia: LatticeField  # finer folding of the cerebellum
    tex: LatticeField
    kind: str = "brain"
    structures: tuple[Structure, ...] = STRUCTURES
    fov_shape: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def random(cls, rng: np.random.Generator) -> BrainAnatomy:
        """Draw a head: size, shape, folding pattern, ventricle size and pose vary."""
        k = float(rng.uniform(0.94, 1.04))
        a, b, c = (float(v) for v in np.array([29.0, 33.0, 27.0]) * k * rng.uniform(0.96, 1.03, 3))
        geo = {"k": k, "a": a, "b": b, "c_top": c, "c_bot": 0.93 * c, "cz": -1.0}
        geo |= {
            "skull_t": float(rng.uniform(3.6, 4.8)),
            "fat_t": float(rng.uniform(1.8, 3.4)),
            "gap": float(rng.uniform(1.0, 2.0)),
            "depth": float(rng.uniform(7.0, 10.0)),
            "sulcus_w": float(rng.uniform(1.0, 1.6)),
            "gm_t": float(rng.uniform(2.2, 2.8)),
            "vent": float(rng.uniform(0.8, 1.4)),
            "cc_y": float(rng.uniform(-3.0, 1.0)) * k,
        }
        pose = Pose.random(rng, (10.0, 6.0, 8.0), 2.0)
        return cls(
            pose=pose,
            geo=geo,
            skull_pert=PlaneWaves.random(rng, 6, (1.0, 2.5), 0.03),
            gap_pert=PlaneWaves.random(rng, 6, (1.5, 4.0), 0.35),
            detail_pert=PlaneWaves.random(rng, 4, (0.05, 0.12), 0.25),
            fissure_pert=PlaneWaves.random(rng, 3, (0.04, 0.12), 0.8),
            fold=LatticeField.random(
                rng, half_width_mm=48, spacing_mm=1.5, corr_mm=3.0, gradient=True
            ),
            folia=LatticeField.random(
                rng, half_width_mm=40, spacing_mm=1.0, corr_mm=1.3, gradient=True
            ),
            tex=LatticeField.random(rng, half_width_mm=64, spacing_mm=3.0, corr_mm=3.0, order=1),
        )

    def texture(self, x: F32, y: F32, z: F32) -> F32:
        """Smooth unit-variance intensity texture."""
        return self.tex(x, y, z)

    def _stem(self) -> tuple[Vec, Vec, float]:
        g = self.geo
        top = (0.0, -0.2 * g["b"], g["cz"] - 0.1 * g["c_top"])
        return top, (0.0, -0.32 * g["b"], -90.0), 5.0 * g["k"]

    def structure_ids(self, x: F32, y: F32, z: F32) -> U8:
        """Structure id at each point (flat arrays, subject frame, mm)."""
        g = self.geo
        ids = np.zeros(x.shape, np.uint8)
        zs = z - np.float32(g["cz"])
        r = np.sqrt(x * x + y * y + zs * zs) + np.float32(1e-3)
        cz = np.where(zs > 0, np.float32(g["c_top"]), np.float32(g["c_bot"]))
        q = np.sqrt((x / g["a"]) ** 2 + (y / g["b"]) ** 2 + (zs / cz) ** 2)
        ux, uy, uz = x / r, y / r, zs / r
        ds = r - r / np.maximum(q, np.float32(1e-6)) * (1 + self.skull_pert(ux, uy, uz))

        # Body: cranium, face and neck, with skin and subcutaneous fat.
        a, b, cb = g["a"], g["b"], g["c_bot"]
        d_head = ds - np.float32(g["skull_t"] + g["fat_t"] + SKIN_MM)
        d_face = ellipsoid_distance(
            x, y, z, (0.0, 0.55 * b, g["cz"] - 0.72 * cb), (0.84 * a, 0.62 * b, 0.62 * cb)
        )
        neck = ellipse_distance(x, y, (0.0, -0.12 * b), (0.7 * a, 0.68 * b))
        d_neck = np.maximum(neck, z - np.float32(g["cz"] - 0.3 * cb))
        d_body = smooth_min(smooth_min(d_head, d_face, 6.0), d_neck, 8.0)
        ids[d_body < 0] = MUSCLE
        ids[(d_body < 0) & (d_body > -(SKIN_MM + g["fat_t"]))] = SCALP_FAT
        ids[(d_body < 0) & (d_body > -SKIN_MM)] = SKIN
        for side in (-1.0, 1.0):
            d_eye = ellipsoid_distance(
                x, y, z, (side * 0.38 * a, 0.95 * b, g["cz"] - 0.62 * cb), (5.0, 5.0, 5.0)
            )
            ids[d_eye < 2.5] = ORBIT_FAT
            ids[d_eye < 0] = EYE
        sinus = ellipsoid_distance(
            x, y, z, (0.0, 0.72 * b, g["cz"] - 0.98 * cb), (0.28 * a, 0.22 * b, 0.2 * cb)
        )
        ids[sinus < 0] = SINUS

        # Skull, with a foramen for the brainstem; below it the canal and the vertebrae.
        top, bottom, stem_r = self._stem()
        d_stem = segment_distance(x, y, z, top, bottom) - np.float32(stem_r)
        canal = stem_r * 0.3 + 1.2
        skull = (ds >= 0) & (ds < g["skull_t"]) & ~((d_stem < canal) & (zs < 0))
        ids[skull] = BONE
        ids[skull & (ds > TABLE_MM) & (ds < g["skull_t"] - TABLE_MM)] = MARROW
        spine = (ds >= 0) & (zs < 0) & (d_body < 0)
        axis_y = top[1] + (z - top[2]) * np.float32((bottom[1] - top[1]) / (bottom[2] - top[2]))
        d_body_v = ellipse_distance(x, y - axis_y, (0.0, 9.5 * g["k"]), (6.0, 5.0))
        ids[spine & ((d_stem < canal + 3.0) | (d_body_v < 0))] = BONE
        ids[spine & (((d_stem > canal + 1) & (d_stem < canal + 2)) | (d_body_v < -1))] = MARROW
        ids[spine & (d_stem < canal)] = CSF
        ids[spine & (d_stem < 0)] = CORD

        inside = np.flatnonzero(ds < 0)
        ids[inside] = CSF
        self._brain(ids, inside, x[inside], y[inside], z[inside], ds[inside],
                    (ux[inside], uy[inside], uz[inside]), d_stem[inside])  # fmt: skip
        return ids

    def _brain(
        self,
        ids: U8,
        sub: np.ndarray[tuple[int], np.dtype[np.intp]],
        x: F32,
        y: F32,
        z: F32,
        ds: F32,
        u: tuple[F32, F32, F32],
        d_stem: F32,
    ) -> None:
        """Paint the brain into ``ids[sub]``; the other arguments are sampled at ``sub``."""
        g = self.geo
        k, a, b, cb = g["k"], g["a"], g["b"], g["c_bot"]
        gap = np.maximum(np.float32(g["gap"]) * (1 + self.gap_pert(*u)), np.float32(0.5))
        e_hull = ds + gap
        d_cb = ellipsoid_distance(
            x, y, z, (0.0, -0.62 * b, g["cz"] - 0.55 * cb), (0.62 * a, 0.3 * b, 0.34 * cb)
        )
        e_cr = np.maximum(e_hull, TENTORIUM_MM - d_cb)  # cerebrum
        e_cbl = np.maximum(e_hull, d_cb)  # cerebellum
        detail = self.detail_pert(x, y, z)

        # Cerebrum: fissure, sulci, cortical ribbon, white matter.
        cr = np.flatnonzero(e_cr < 0)
        xc, yc, zc, ec, dc = x[cr], y[cr], z[cr], e_cr[cr], detail[cr]
        cc_y, cc_len, cc_h = g["cc_y"], 0.45 * b, 8.0 * k
        t = np.clip((yc - cc_y) / cc_len, -1.0, 1.0)
        floor = np.where(
            np.abs(yc - cc_y) < cc_len, np.float32(g["cz"] + 1) + cc_h * np.sqrt(1 - t * t), -1e3
        ).astype(np.float32)
        wobble = self.fissure_pert(np.zeros_like(yc), yc, zc)
        sd_fiss = np.maximum(np.abs(xc - wobble) - FISSURE_MM / 2, floor - zc)
        depth = np.float32(g["depth"]) * (1 + dc)
        sd_sulc = np.full(cr.shape, np.inf, np.float32)
        shell = np.flatnonzero(ec > -(depth + g["gm_t"] * 1.5 + 1.0))
        s = self.fold.zero_distance(xc[shell], yc[shell], zc[shell])
        sd_sulc[shell] = np.maximum(s - g["sulcus_w"] / 2, -(ec[shell] + depth[shell]))
        open_csf = np.minimum(sd_sulc, sd_fiss)
        pial = np.minimum(-ec, open_csf)
        gm_t = np.float32(g["gm_t"]) * (1 + 0.5 * dc)
        ids[sub[cr]] = np.where(open_csf < 0, SULCAL_CSF, np.where(pial < gm_t, CORTEX, WM))

        # Cerebellum: finer folia around a white-matter core.
        cl = np.flatnonzero((e_cbl < 0) & (e_cr >= 0))
        e2 = e_cbl[cl]
        s2 = self.folia.zero_distance(x[cl], y[cl], z[cl])
        sd_f = np.maximum(s2 - 0.35, -(e2 + 4.0))
        pial2 = np.minimum(-e2, sd_f)
        ids[sub[cl]] = np.where(sd_f < 0, SULCAL_CSF, np.where(pial2 < 1.6, CB_GM, CB_WM))

        # Brainstem, deep grey matter and lateral ventricles.
        top_z = self._stem()[0][2]
        ids[sub[(d_stem < 0) & (z < top_z)]] = BRAINSTEM
        v = g["vent"]
        vax, vay, vaz = 2.6 * v, 0.42 * b, 3.0 * v
        vz = g["cz"] + 1 + cc_h - 3.0 - vaz
        xv = 0.8 + vax
        region = sub
        for side in (-1.0, 1.0):
            for center, semi in (
                ((side * (xv + 2.5), cc_y - 6 * k, vz - 5.0 * k), (4.0 * k, 6.0 * k, 4.0 * k)),
                ((side * (xv + vax + 1.5), cc_y + 6 * k, vz + 1.0), (2.2 * k, 6.0 * k, 3.0 * k)),
                ((side * 13.0 * k, cc_y + 3 * k, vz - 5.0 * k), (2.8 * k, 8.0 * k, 5.0 * k)),
            ):
                inside = ellipsoid_distance(x, y, z, center, semi) < 0
                current = ids[region]
                ids[region[inside & ((current == WM) | (current == BRAINSTEM))]] = DEEP_GM
        yy = y - np.float32(cc_y)
        xx = np.abs(x) - (xv + 0.12 * np.maximum(-yy, 0))
        zz = z - (vz - 0.012 * yy * yy)
        vent = (xx / vax) ** 2 + (yy / vay) ** 2 + (zz / vaz) ** 2 < 1
        current = ids[region]
        ids[region[vent & ((current == WM) | (current == DEEP_GM))]] = VENTRICLE
