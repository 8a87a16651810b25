"""Policy schema, parsing and validation; instance-record parsing.

* :func:`parse_policy` / :func:`parse_policy_dict` -> :class:`Policy` (or :class:`PolicyError`)
* :func:`load_policy_document`: YAML/JSON text -> raw mapping (syntax checks only) and
  :func:`merge_policy_dicts`: service policy deep-merged over the default policy
  (:mod:`meshlib.config.documents`; the schema is :mod:`meshlib.config.policy`)
* :func:`parse_instance_record` -> :class:`~meshlib.core.endpoints.Endpoint` (or
  :class:`RecordError`)
* :func:`parse_duration` / :func:`format_duration` and the pydantic types :data:`Duration`,
  :data:`PositiveDuration`
"""

from meshlib.config.documents import load_policy_document, merge_policy_dicts
from meshlib.config.durations import (
    Duration,
    DurationError,
    PositiveDuration,
    format_duration,
    parse_duration,
)
from meshlib.config.errors import MISSING, ConfigError, FieldError, PolicyError, RecordError
from meshlib.config.policy import (
    DEFAULT_POLICY,
    GRPC_STATUS_NAMES,
    IDEMPOTENT_METHODS,
    AbortFault,
    Access,
    Backoff,
    CircuitBreaker,
    Concurrency,
    DelayFault,
    Ewma,
    Fault,
    FrozenDict,
    HashOn,
    HealthCheck,
    Hedging,
    LoadBalancer,
    OutlierDetection,
    Policy,
    Retries,
    RetryBudget,
    Route,
    RouteMatch,
    Split,
    Subset,
    parse_policy,
    parse_policy_dict,
)
from meshlib.config.records import parse_instance_record

__all__ = [
    "DEFAULT_POLICY",
    "GRPC_STATUS_NAMES",
    "IDEMPOTENT_METHODS",
    "MISSING",
    "AbortFault",
    "Access",
    "Backoff",
    "CircuitBreaker",
    "Concurrency",
    "ConfigError",
    "DelayFault",
    "Duration",
    "DurationError",
    "Ewma",
    "Fault",
    "FieldError",
    "FrozenDict",
    "HashOn",
    "HealthCheck",
    "Hedging",
    "LoadBalancer",
    "OutlierDetection",
    "PolicyError",
    "Policy",
    "PositiveDuration",
    "RecordError",
    "Retries",
    "RetryBudget",
    "Route",
    "RouteMatch",
    "Split",
    "Subset",
    "format_duration",
    "load_policy_document",
    "merge_policy_dicts",
    "parse_duration",
    "parse_instance_record",
    "parse_policy",
    "parse_policy_dict",
]
