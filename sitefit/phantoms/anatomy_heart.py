"""Chest phantom for short-axis-like cardiac segmentation, defined in millimetres.

Subject frame: x to the right, y anterior, z superior (millimetres at the reference field of
view); the left-ventricular long axis runs close to z, so axial slices look like short-axis
views. The LV is a truncated prolate half-ellipsoid (cavity inside a myocardial shell whose
thickness varies with the seed and the cardiac phase) with two papillary muscles; the RV is a
half-ellipsoid beside it, carved by the LV into a crescent, with a thin free wall. Context
that must not be labelled looks alike: atria, aortic root, pulmonary trunk, caval vein and the
descending aorta hold the same blood as the ventricles; the RV wall and atrial walls are
myocardium; chest-wall muscle and liver are as dark as the LV wall. Around them: lungs with
vessels, epicardial and mediastinal fat, ribs, sternum, spine, the diaphragm with liver,
spleen and stomach below.

Labels (task ``heart``): 1 LV cavity (papillary muscles included), 2 LV myocardium, 3 RV cavity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sitefit.phantoms.fields import (
    F32,
    U8,
    LatticeField,
    Pose,
    ellipse_distance,
    ellipsoid_distance,
    rotation,
)
from sitefit.phantoms.structures import Structure


def _s(name: str, tissue: str, label: int, texture: float) -> Structure:
    return Structure(name, tissue, {"heart": label}, texture)


STRUCTURES: tuple[Structure, ...] = (
    _s("air", "air", 0, 0.0),
    _s("skin", "skin", 0, 0.05),
    _s("fat", "fat", 0, 0.05),
    _s("muscle", "muscle", 0, 0.06),
    _s("bone", "bone", 0, 0.1),
    _s("marrow", "marrow", 0, 0.08),
    _s("lung", "lung", 0, 0.2),
    _s("lung_vessel", "blood", 0, 0.05),
    _s("vessel", "blood", 0, 0.04),
    _s("atrium", "blood", 0, 0.04),
    _s("atrial_wall", "myocardium", 0, 0.05),
    _s("rv_wall", "myocardium", 0, 0.05),
    _s("rv_cavity", "blood", 3, 0.04),
    _s("lv_myocardium", "myocardium", 2, 0.05),
    _s("lv_cavity", "blood", 1, 0.04),
    _s("papillary", "myocardium", 1, 0.05),
    _s("liver", "liver", 0, 0.05),
    _s("spleen", "liver", 0, 0.05),
    _s("stomach", "fluid", 0, 0.05),
    _s("spinal_csf", "fluid", 0, 0.04),
    _s("cord", "muscle", 0, 0.04),
)
(AIR, SKIN, FAT, MUSCLE, BONE, MARROW, LUNG, LUNG_VESSEL, VESSEL, ATRIUM, ATRIAL_WALL, RV_WALL,
 RV_CAVITY, LV_MYO, LV_CAVITY, PAPILLARY, LIVER, SPLEEN, STOMACH, SPINAL_CSF, CORD,
 ) = range(len(STRUCTURES))  # fmt: skip

SKIN_MM = 1.2
RIB_BAND_MM = 3.5


@dataclass(frozen=True, eq=False)
class HeartAnatomy:
    """One random chest. Build with :meth:`random`; sample with :meth:`structure_ids`."""

    pose: Pose
    geo: dict[str, float]
    heart_rot: np.ndarray[tuple[int, int], np.dtype[np.float64]]  # heart frame -> subject frame
    vessels: LatticeField  # lung vessels where this field is high
    tex: LatticeField
    kind: str = "heart"
    structures: tuple[Structure, ...] = STRUCTURES
    fov_shape: tuple[float, float, float] = (1.0, 1.0, 0.625)

    @classmethod
    def random(cls, rng: np.random.Generator) -> HeartAnatomy:
        """Draw a chest: body habitus, heart size, wall thickness, phase, position vary."""
        u = rng.uniform
        k = float(u(0.9, 1.1))  # heart size
        kt = float(u(0.93, 1.05))  # torso size
        phase = float(u(0.0, 1.0))  # 0 end-diastole .. 1 end-systole
        rc = 10.5 * k * (1 - 0.22 * phase)
        wall = float(u(3.8, 5.2)) * k * (1 + 0.4 * phase)
        geo = {
            "k": k, "a_t": 62.0 * kt, "b_ant": 36.0 * kt, "b_post": 31.0 * kt,
            "fat": float(u(2.0, 7.0)), "mus": float(u(3.0, 5.0)), "rib_phase": float(u(0, 6.3)),
            "lv_x": -9.0 * k + float(u(-2, 2)), "lv_y": 4.0 * k + float(u(-2, 2)),
            "z_base": float(u(8.0, 13.0)), "rc": rc, "wall": wall,
            "lc": 27.0 * k * (1 - 0.1 * phase), "psi": float(np.deg2rad(30.0 + u(-10, 10))),
            "ell": float(u(0.0, 0.08)), "ell_dir": float(u(0.0, np.pi)), "rv": float(u(0.9, 1.15)),
            "rv_wall": float(u(1.5, 2.5)),
            "epi_fat": float(u(0.6, 2.0)), "dome_r": float(u(-26.0, -20.0)),
            "dome_l": float(u(2.0, 5.0)),
        }  # fmt: skip
        heart_rot = rotation(float(u(-8, 8)), float(u(-8, 8)), float(u(-20, 20)))
        return cls(
            pose=Pose.random(rng, (4.0, 4.0, 8.0), 2.5),
            geo=geo,
            heart_rot=heart_rot,
            vessels=LatticeField.random(rng, half_width_mm=64, spacing_mm=1.5, corr_mm=1.4),
            tex=LatticeField.random(rng, half_width_mm=64, spacing_mm=3.0, corr_mm=3.0, order=1),
        )

    def texture(self, x: F32, y: F32, z: F32) -> F32:
        """Smooth unit-variance intensity texture."""
        return self.tex(x, y, z)

    def structure_ids(self, x: F32, y: F32, z: F32) -> U8:
        """Structure id at each point (flat arrays, subject frame, mm)."""
        g = self.geo
        ids = np.zeros(x.shape, np.uint8)
        # Torso: a superellipse in x-y, flatter at the back; skin, fat, muscle, ribs, cavity.
        semi_y = np.where(y > 0, np.float32(g["b_ant"]), np.float32(g["b_post"]))
        q = ((np.abs(x) / g["a_t"]) ** 2.3 + (np.abs(y) / semi_y) ** 2.3) ** (1 / 2.3)
        rxy = np.sqrt(x * x + y * y)
        dt = rxy - rxy / np.maximum(q, np.float32(1e-6))
        back = np.maximum(-y / semi_y, 0) ** 2
        wall = SKIN_MM + g["fat"] + g["mus"] + 6.0 * back
        ids[dt < 0] = MUSCLE
        ids[(dt < 0) & (dt > -(SKIN_MM + g["fat"]))] = FAT
        ids[(dt < 0) & (dt > -SKIN_MM)] = SKIN
        band = (dt <= -wall) & (dt > -(wall + RIB_BAND_MM))
        rib = np.sin(2 * np.pi * (z - 0.3 * np.abs(y)) / 14.0 + g["rib_phase"])
        ids[band & (rib > 0.35)] = BONE
        ids[band & (rib > 0.75)] = MARROW
        sternum = band & (np.abs(x) < 7.0) & (y > 0)
        ids[sternum] = BONE
        ids[sternum & (dt < -(wall + 1.0)) & (dt > -(wall + RIB_BAND_MM - 1.0))] = MARROW
        cavity = dt <= -(wall + RIB_BAND_MM)
        ids[cavity] = LUNG

        # Below the diaphragm: liver on the right, spleen and stomach on the left.
        zb = g["z_base"]
        dome_r = zb + g["dome_r"] - ((x - 16.0) ** 2 + y**2) / 110.0
        apex_z = zb - (g["lc"] + 0.8 * g["wall"])
        dome_l = apex_z - g["dome_l"] - ((x + 14.0) ** 2 + y**2) / 100.0
        abdomen = (dt <= -(SKIN_MM + g["fat"] + g["mus"])) & (z < np.maximum(dome_r, dome_l))
        ids[abdomen] = np.where(x > -4.0, LIVER, SPLEEN)[abdomen]
        stomach = ellipsoid_distance(x, y, z, (-18.0, 8.0, apex_z - g["dome_l"] - 12.0),
                                     (12.0, 10.0, 9.0))  # fmt: skip
        ids[abdomen & (stomach < 0)] = STOMACH

        # Spine, paraspinal muscles, oesophagus, descending aorta.
        yv = -g["b_post"] + 19.0
        ids[(dt < 0) & (np.abs(x) < 16.0) & (y < yv + 2.0)] = MUSCLE
        d_vert = ellipse_distance(x, y, (0.0, yv), (7.5, 7.0))
        ids[d_vert < 0] = BONE
        ids[d_vert < -1.2] = MARROW
        d_canal = ellipse_distance(x, y, (0.0, yv - 11.0), (4.5, 4.5))
        ids[d_canal < 0] = SPINAL_CSF
        ids[d_canal < -2.0] = CORD
        ids[ellipse_distance(x, y, (-1.0, yv + 10.0), (3.0, 3.0)) < 0] = MUSCLE
        ids[ellipse_distance(x, y, (-9.0, yv + 3.0), (5.5, 5.5)) < 0] = VESSEL

        near = np.flatnonzero(
            (np.abs(x - g["lv_x"]) < 45) & (np.abs(y - g["lv_y"]) < 40) & (z > apex_z - 12)
        )
        self._heart(ids, near, x[near], y[near], z[near])
        lung = np.flatnonzero(ids == LUNG)
        vessel = self.vessels(x[lung], y[lung], z[lung]) > 1.9
        ids[lung[vessel]] = LUNG_VESSEL
        return ids

    def _heart(
        self, ids: U8, sub: np.ndarray[tuple[int], np.dtype[np.intp]], x: F32, y: F32, z: F32
    ) -> None:
        """Paint mediastinum, great vessels, atria and ventricles into ``ids[sub]``."""
        g = self.geo
        k, rc, wall, lc = g["k"], g["rc"], g["wall"], g["lc"]
        centre = np.array([g["lv_x"], g["lv_y"], g["z_base"]])
        rt = self.heart_rot.T.astype(np.float32)
        px, py, pz = x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2])
        q1 = rt[0, 0] * px + rt[0, 1] * py + rt[0, 2] * pz
        q2 = rt[1, 0] * px + rt[1, 1] * py + rt[1, 2] * pz
        w = rt[2, 0] * px + rt[2, 1] * py + rt[2, 2] * pz
        re = rc + wall
        psi = g["psi"]

        def at(angle: float, radius: float) -> tuple[float, float]:
            return radius * float(np.cos(psi + angle)), radius * float(np.sin(psi + angle))

        # Mediastinal fat: around the great vessels above the base, and around the ventricles.
        rho2 = q1 * q1 + q2 * q2 + np.float32(1e-6)
        rho = np.sqrt(rho2)
        cos2 = (q1 * q1 - q2 * q2) / rho2
        sin2 = 2 * q1 * q2 / rho2
        ell = g["ell"] * (cos2 * np.cos(2 * g["ell_dir"]) + sin2 * np.sin(2 * g["ell_dir"]))
        rho_e = rho / (1 + ell)
        le = lc + 0.8 * wall
        fat_t = np.maximum(g["epi_fat"] * (1 + 1.2 * self.tex(x, y, z)), 0.0)
        tf = np.clip(w / (le + fat_t), -1, 0)
        fat_zone = (w > -(le + fat_t)) & (w < 2.0) & (rho_e < (re + fat_t) * np.sqrt(1 - tf * tf))
        upper = (w > -4.0) & (ellipse_distance(q1, q2, at(0.6, 0.5 * re), (16.0 * k, 14.0 * k)) < 0)
        ids[sub[fat_zone | upper]] = FAT

        # Atria, aortic root, pulmonary trunk, caval vein.
        for angle, radius, wz, semi in ((np.pi + 0.45, 0.55 * re, 8.0 * k, (12.0, 9.0, 8.0)),
                                        (-0.6, 1.35 * re, 6.0 * k, (10.0, 10.0, 9.0))):  # fmt: skip
            c1, c2 = at(angle, radius)
            d = ellipsoid_distance(q1, q2, w, (c1, c2, wz), (semi[0] * k, semi[1] * k, semi[2] * k))
            ids[sub[(d < 1.5) & (w > -1.0)]] = ATRIAL_WALL
            ids[sub[(d < 0) & (w > -1.0)]] = ATRIUM
        for angle, radius, r, w0 in (
            (1.05, 0.3 * re, 5.5 * k, -1.0),
            (0.7, 1.2 * re, 5.0 * k, 3.0),
        ):
            d = ellipse_distance(q1, q2, at(angle, radius), (r, r))
            ids[sub[(d < 0) & (w > w0)]] = VESSEL
        svc = ellipse_distance(x, y, (g["lv_x"] + 24.0 * k, g["lv_y"] - 4.0), (4.5, 4.5))
        ids[sub[(svc < 0) & (w > 6.0)]] = VESSEL

        # Right ventricle: a half-ellipsoid beside the LV, carved by it into a crescent.
        cp, sp = np.float32(np.cos(psi)), np.float32(np.sin(psi))
        u1, u2 = q1 * cp + q2 * sp, -q1 * sp + q2 * cp
        lrv = 0.75 * lc
        s = np.sqrt(np.clip(1 - (np.minimum(w, 0) / lrv) ** 2, 0, 1)) * (w <= 1.5)
        a_r, b_r, off = 0.95 * re * g["rv"], 1.45 * re * g["rv"], 0.55 * re
        t_rv = g["rv_wall"]
        rv_in = ((u1 - off * s) / (a_r * s + 1e-3)) ** 2 + (u2 / (b_r * s + 1e-3)) ** 2 < 1
        rv_out = ((u1 - off * s) / (a_r * s + t_rv)) ** 2 + (u2 / (b_r * s + t_rv)) ** 2 < 1
        rv_out &= (w <= 1.5 + t_rv) & (w > -(lrv + t_rv))

        # Left ventricle: cavity inside a myocardial shell, base plane at w = 0.
        tc = np.clip(w / lc, -1, 0)
        cavity = (w <= 0) & (w >= -lc) & (rho_e < rc * np.sqrt(1 - tc * tc))
        te = np.clip(w / le, -1, 0)
        epi = (w <= 0) & (w >= -le) & (rho_e < re * np.sqrt(1 - te * te))
        ids[sub[rv_out & ~epi]] = RV_WALL
        ids[sub[rv_in & ~epi & (s > 0)]] = RV_CAVITY
        ids[sub[epi]] = LV_MYO
        ids[sub[cavity]] = LV_CAVITY
        for angle in (np.pi - 0.9, np.pi + 0.9):
            c1, c2 = at(angle, 0.55 * rc)
            scale = np.sqrt(1 - tc * tc)
            d = np.sqrt((q1 - c1 * scale) ** 2 + (q2 - c2 * scale) ** 2)
            ids[sub[cavity & (d < 1.8 * k) & (w > -0.75 * lc) & (w < -0.2 * lc)]] = PAPILLARY
