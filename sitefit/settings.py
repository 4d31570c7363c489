"""Configuration from ``SITEFIT_*`` environment variables, read once and passed explicitly."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sitefit import defaults
from sitefit.routing import AnyDestination, Destination, Route, check_ae_title, check_routes

BatchNormMode = Literal["train", "frozen"]
StatisticsAverage = Literal["cumulative", "momentum"]  # worker.refinement.RefineConfig
SiteStatistics = Literal["pooled", "latest"]  # worker.site_update
SiteFirstSave = Literal["beats_start", "guarded"]  # worker.engine


class Settings(BaseSettings):
    """All of sitefit's configuration. Construct once at the edge (CLI, app factory, worker)."""

    # "null" unsets an optional setting (e.g. SITEFIT_AUTO_MARGIN=null: off)
    model_config = SettingsConfigDict(
        env_prefix="SITEFIT_", extra="ignore", env_parse_none_str="null"
    )

    home: Path = Field(default=Path(defaults.HOME), description="Model store and job data root.")
    device: str | None = Field(
        default=None, description="Torch device for the engine; default: cuda when available."
    )
    tolerance_mm: float = Field(default=defaults.SURFACE_TOLERANCE_MM, gt=0)
    refine_max_epochs: int = Field(default=defaults.REFINE_MAX_EPOCHS, ge=1, le=200)
    refine_lr: float = Field(
        default=defaults.REFINE_LR,
        ge=0,
        le=10,
        description="Adam learning rate of the init path; 0 (with refine_batchnorm 'train'): "
        "only the batch-norm statistics adapt to the scan",
    )
    refine_batch_size: int = Field(
        default=defaults.REFINE_BATCH_SIZE,
        ge=2,
        description="slices per refinement step (batch norm needs at least 2 for statistics)",
    )
    refine_statistics_average: StatisticsAverage = Field(
        default=defaults.REFINE_STATISTICS_AVERAGE,
        description="with refine_lr 0: 'cumulative': the batch-norm running statistics become "
        "the plain mean of the refinement's batch statistics (the scan's own after one epoch); "
        "'momentum': the exponential average of the authors' code",
    )
    refine_statistics_passes: int = Field(
        default=defaults.REFINE_STATISTICS_PASSES,
        ge=1,
        le=100,
        description="with refine_lr 0 and the cumulative average: passes over the scan (each "
        "a new shuffle into batches) whose batch statistics it averages",
    )
    refine_min_statistics_steps: int = Field(
        default=defaults.REFINE_MIN_STATISTICS_STEPS,
        ge=0,
        le=10_000,
        description="with refine_lr 0 and the momentum average: batch-norm update steps before "
        "the stopping rule may stop the refinement (the epoch cap still holds)",
    )
    refine_batchnorm: BatchNormMode = Field(
        default="train",
        description="'train': BN layers use and update target batch statistics while refining "
        "(the authors' code); 'frozen': BN keeps the source statistics.",
    )
    max_voxels: int = Field(default=defaults.MAX_VOXELS, ge=1)

    # Site policy and guard (engine).
    auto_threshold: float = Field(
        default=defaults.AUTO_THRESHOLD,
        ge=0,
        le=1,
        description="mode auto uses a site's cached weights as they are when their "
        "self-consistency (Dice early vs final) on the scan is at least this",
    )
    auto_margin: float | None = Field(
        default=defaults.AUTO_MARGIN,
        ge=0,
        le=1,
        description="mode auto also uses them when their self-consistency on the scan is "
        "within this of what they reached on the scan they were refined on; null: off",
    )
    site_statistics: SiteStatistics = Field(
        default=defaults.SITE_STATISTICS,
        description="with refine_lr 0: 'pooled': a site version's batch-norm statistics are "
        "the mean over every scan the site was refined on (each scan weighs the same); "
        "'latest': those of the scan it was last refined on (with the base model's as the prior)",
    )
    site_statistics_prior: float = Field(
        default=defaults.SITE_STATISTICS_PRIOR,
        ge=0,
        le=100,
        description="with refine_lr 0: how many scans the base model's batch-norm statistics "
        "weigh in a site version's pool (0: the scans' alone); a version refined on one scan "
        "holds statistics 1 / (1 + prior) of the way from the base model's to the scan's",
    )
    site_first_save: SiteFirstSave = Field(
        default=defaults.SITE_FIRST_SAVE,
        description="when a site's first version is saved: 'guarded', whenever the guard "
        "kept a refinement of the scan (later versions must still beat the version they "
        "started from); 'beats_start', like every later version, only when its "
        "self-consistency on the scan beats the base model's",
    )
    model_cache_bytes: int = Field(
        default=defaults.MODEL_CACHE_BYTES, ge=0, description="warm site-model cache budget"
    )
    guard: bool = Field(default=True, description="revert refinements the guard judges harmful")
    guard_max_volume_change: float = Field(default=defaults.GUARD_MAX_VOLUME_CHANGE, gt=0)
    guard_min_agreement: float = Field(default=defaults.GUARD_MIN_AGREEMENT, ge=0, le=1)
    guard_min_consistency_gain: float | None = Field(
        default=None,
        le=1,
        description="an epoch's self-consistency must reach the start's plus this; null: the "
        "refinement's default (0.05 for the self-training, -0.05 with refine_lr 0)",
    )
    guard_max_entropy_rise: float = Field(
        default=defaults.GUARD_MAX_ENTROPY_RISE,
        gt=0,
        description="largest relative rise of the final output's mean entropy (inf: off)",
    )

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str | None) -> str | None:
        if value is None or value == "cpu" or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def sites_dir(self) -> Path:
        return self.home / "sites"

    # --- Service: HTTP API, job queue, workers, job data (issue 4) --------------------------
    # Read by `sitefit serve` / `sitefit worker`; the engine and the CLI ignore them.
    host: str = Field(default="127.0.0.1", description="Address `sitefit serve` binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of `sitefit serve`.")
    redis_url: str | None = Field(
        default=None,
        description="Redis of the RQ job queue (redis://HOST:PORT/DB); unset: embedded mode, "
        "`sitefit serve` runs jobs on an in-process worker thread.",
    )
    api_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description='JSON {"KEY": ["site-a", ...] or ["*"]}: the sites each API key may use. '
        "Empty: no authentication, and the server only binds to loopback.",
    )
    queue_name: str = Field(default="sitefit", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    job_timeout_s: int = Field(default=3600, ge=1, description="A job running longer fails.")
    job_retries: int = Field(
        default=1, ge=0, le=5, description="Re-runs of a job whose worker died (kill -9, crash)."
    )
    job_retention_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="Job data is deleted this long after the end."
    )
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024, description="Per request.")
    worker_heartbeat_s: int = Field(
        default=10, ge=1, le=600, description="A job whose worker is silent 3x this long is dead."
    )
    maintenance_interval_s: float = Field(
        default=5.0, gt=0, description="How often the API reaps dead jobs and expired data."
    )
    warm_routing: bool = Field(
        default=False,
        description="Send a job for a site to a worker that holds the site's weights warm "
        "(each worker also listens on a queue of its own); off: every job goes to the shared "
        "queue. API and workers may differ: a job is only routed to a worker that says so.",
    )
    warm_routing_wait_s: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        description="A job routed to a warm worker that has not started it after this long "
        "(busy, or gone) moves to the shared queue. Above 60 s a dead worker would hold its "
        "jobs back for minutes; below 0.1 s the API would poll Redis without pause.",
    )

    # --- PACS: DIMSE listener, DICOMweb, routes and destinations, DICOM SEG ---------------
    # Read by `sitefit dicom-listener`, `sitefit serve` and the job; docs/pacs.md.
    dicom_host: str = Field(default="127.0.0.1", description="Address the DIMSE listener binds.")
    dicom_port: int = Field(default=11112, ge=1, le=65535, description="DIMSE listener port.")
    dicom_ae_title: str = Field(
        default="SITEFIT",
        description="The listener's own AE title (C-ECHO, and series sent to no route's AE "
        "title go to the route named 'default' if there is one); also our calling AE title "
        "when sending results.",
    )
    dicom_allowed_callers: list[str] = Field(
        default_factory=list,
        description="Calling AE titles the listener accepts; empty: any caller, which "
        "is only allowed while it binds to loopback.",
    )
    dicom_max_associations: int = Field(default=10, ge=1, le=1000)
    dicom_max_series_instances: int = Field(
        default=defaults.MAX_SERIES_INSTANCES,
        ge=2,
        le=defaults.MAX_SERIES_INSTANCES,
        description="Instances one series may hold; more are refused.",
    )
    dicom_max_series_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Bytes one series may hold; more is refused."
    )
    series_idle_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="A series is complete when no instance arrived for this long; then it "
        "becomes one job.",
    )
    dicom_routes: dict[str, Route] = Field(
        default_factory=dict,
        description='JSON {"NAME": {"model": ..., "mode": ..., "site": ..., "ae_title": ..., '
        '"destinations": [...]}}: what series sent to each route become (docs/pacs.md).',
    )
    dicom_destinations: dict[str, Destination] = Field(
        default_factory=dict,
        description='JSON {"NAME": {"kind": "dimse", "host", "port", "ae_title"} or {"kind": '
        '"dicomweb", "url", "bearer_token" | "username" + "password"}}: where SEGs are sent.',
    )
    site_key_headers: list[str] = Field(
        default_factory=lambda: list(defaults.SITE_KEY_HEADERS),
        min_length=1,
        description="DICOM keywords a series' site key is derived from, when its route fixes "
        "no site.",
    )
    seg_omit_empty_frames: bool = Field(
        default=False,
        description="Leave frames without any segment out of the DICOM SEG (some viewers "
        "misplace such SEGs: keep the default).",
    )
    delivery_attempts: int = Field(
        default=6, ge=1, le=100, description="Tries to send a result before it is listed failed."
    )
    delivery_backoff_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Wait before the second try; it doubles after each failure, up to 30 min.",
    )
    delivery_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Network timeout of one try."
    )

    @field_validator("dicom_ae_title")
    @classmethod
    def _own_ae_title_ok(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("dicom_allowed_callers")
    @classmethod
    def _callers_ok(cls, value: list[str]) -> list[str]:
        return [check_ae_title(title) for title in value]

    @model_validator(mode="after")
    def _routes_consistent(self) -> Settings:
        destinations: dict[str, AnyDestination] = dict(self.dicom_destinations)
        check_routes(self.dicom_routes, destinations)
        for name, route in self.dicom_routes.items():
            if route.site is not None and not SITE_NAME.fullmatch(route.site):
                raise ValueError(f"route {name!r}: invalid site name {route.site[:40]!r}")
        return self

    @model_validator(mode="after")
    def _refuse_open_dicom_listener(self) -> Settings:
        if not self.dicom_allowed_callers and not is_loopback(self.dicom_host):
            raise ValueError(
                f"dicom_host {self.dicom_host!r} is not a loopback address and no calling AE "
                "titles are allowed: set SITEFIT_DICOM_ALLOWED_CALLERS, or bind to 127.0.0.1"
            )
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url_valid(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # SITEFIT_REDIS_URL= (empty): embedded mode, as when unset
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys_valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for key, sites in value.items():
            if len(key) < 16 or not key.isascii() or not key.isprintable() or " " in key:
                raise ValueError("each API key must be at least 16 printable ASCII characters")
            if not sites:
                raise ValueError('each API key needs a list of sites (or ["*"] for all)')
            for site in sites:
                if site != "*" and not SITE_NAME.fullmatch(site):
                    raise ValueError(f"API key sites must be valid site names, not {site!r}")
        return value

    @model_validator(mode="after")
    def _refuse_refinement_that_changes_nothing(self) -> Settings:
        if self.refine_lr == 0 and self.refine_batchnorm == "frozen":
            raise ValueError(
                "refine_lr 0 with refine_batchnorm 'frozen' would change nothing: "
                "use refine_batchnorm 'train' (statistics only) or a learning rate above 0"
            )
        return self

    @model_validator(mode="after")
    def _refuse_open_network_binding(self) -> Settings:
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and no API keys are configured: "
                "set SITEFIT_API_KEYS, or bind to 127.0.0.1"
            )
        return self


SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
