from gradserve.proto.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    DONE: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
DONE: JobState
FAILED: JobState
CANCELLED: JobState

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _model_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_model_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelManifest(_message.Message):
    __slots__ = ("graph", "parameters", "constants", "model_id")
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    graph: _model_pb2.Graph
    parameters: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    constants: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    model_id: str
    def __init__(self, graph: _Optional[_Union[_model_pb2.Graph, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., constants: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: ModelManifest
    data: TensorChunk
    def __init__(self, manifest: _Optional[_Union[ModelManifest, _Mapping]] = ..., data: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("model_id", "already_present", "bytes_received")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    already_present: bool
    bytes_received: int
    def __init__(self, model_id: _Optional[str] = ..., already_present: _Optional[bool] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "present", "parameter_bytes", "parameter_count", "received_bytes")
    class ReceivedBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    present: bool
    parameter_bytes: int
    parameter_count: int
    received_bytes: _containers.ScalarMap[str, int]
    def __init__(self, model_id: _Optional[str] = ..., present: _Optional[bool] = ..., parameter_bytes: _Optional[int] = ..., parameter_count: _Optional[int] = ..., received_bytes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class JobOptions(_message.Message):
    __slots__ = ("model_id", "partitions", "micro_batches", "replicas", "input_grads", "feeds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    partitions: int
    micro_batches: int
    replicas: int
    input_grads: _containers.RepeatedScalarFieldContainer[str]
    feeds: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, model_id: _Optional[str] = ..., partitions: _Optional[int] = ..., micro_batches: _Optional[int] = ..., replicas: _Optional[int] = ..., input_grads: _Optional[_Iterable[str]] = ..., feeds: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class JobChunk(_message.Message):
    __slots__ = ("options", "feed")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    options: JobOptions
    feed: TensorChunk
    def __init__(self, options: _Optional[_Union[JobOptions, _Mapping]] = ..., feed: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("options", "feeds")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    options: JobOptions
    feeds: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, options: _Optional[_Union[JobOptions, _Mapping]] = ..., feeds: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobHandle(_message.Message):
    __slots__ = ("job_id", "model_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_id: str
    def __init__(self, job_id: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("phase", "partition", "micro_batch", "replica", "done", "node", "seconds")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    partition: int
    micro_batch: int
    replica: int
    done: bool
    node: str
    seconds: float
    def __init__(self, phase: _Optional[str] = ..., partition: _Optional[int] = ..., micro_batch: _Optional[int] = ..., replica: _Optional[int] = ..., done: _Optional[bool] = ..., node: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "model_id", "state", "event", "events", "steps_done", "steps_total", "error_code", "message", "queued_seconds", "running_seconds")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model_id: str
    state: JobState
    event: ProgressEvent
    events: int
    steps_done: int
    steps_total: int
    error_code: str
    message: str
    queued_seconds: float
    running_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., model_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., event: _Optional[_Union[ProgressEvent, _Mapping]] = ..., events: _Optional[int] = ..., steps_done: _Optional[int] = ..., steps_total: _Optional[int] = ..., error_code: _Optional[str] = ..., message: _Optional[str] = ..., queued_seconds: _Optional[float] = ..., running_seconds: _Optional[float] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("job_id", "loss", "grads", "input_grads", "info_json", "data")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    loss: float
    grads: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    input_grads: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    info_json: str
    data: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, job_id: _Optional[str] = ..., loss: _Optional[float] = ..., grads: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., input_grads: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ..., info_json: _Optional[str] = ..., data: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class ResultChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    data: TensorChunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., data: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("model_id", "partitions", "micro_batches", "replicas", "optimizer_json", "max_norm")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    partitions: int
    micro_batches: int
    replicas: int
    optimizer_json: str
    max_norm: float
    def __init__(self, model_id: _Optional[str] = ..., partitions: _Optional[int] = ..., micro_batches: _Optional[int] = ..., replicas: _Optional[int] = ..., optimizer_json: _Optional[str] = ..., max_norm: _Optional[float] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model_id", "steps", "idle_ttl_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_id: str
    steps: int
    idle_ttl_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., model_id: _Optional[str] = ..., steps: _Optional[int] = ..., idle_ttl_seconds: _Optional[float] = ...) -> None: ...

class StepOptions(_message.Message):
    __slots__ = ("session_id", "step", "update", "return_grads", "lr", "feeds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_GRADS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    FEEDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    update: bool
    return_grads: bool
    lr: float
    feeds: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., update: _Optional[bool] = ..., return_grads: _Optional[bool] = ..., lr: _Optional[float] = ..., feeds: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("options", "feed")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    options: StepOptions
    feed: TensorChunk
    def __init__(self, options: _Optional[_Union[StepOptions, _Mapping]] = ..., feed: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("session_id", "weights")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    weights: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, session_id: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    data: TensorChunk
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., data: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class WeightsRequest(_message.Message):
    __slots__ = ("session_id", "names")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "cpus", "memory_bytes", "actors", "busy_actors", "alive")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    BUSY_ACTORS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    cpus: float
    memory_bytes: int
    actors: int
    busy_actors: int
    alive: bool
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., cpus: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., actors: _Optional[int] = ..., busy_actors: _Optional[int] = ..., alive: _Optional[bool] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("version", "engine", "uptime_seconds", "nodes", "jobs", "models", "max_concurrent_jobs", "max_queued_jobs", "model_store_bytes", "model_store_max_bytes", "pending_bytes", "jobs_ended", "worker_retries", "sessions", "session_steps")
    class JobsEndedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_STORE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_STORE_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PENDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    JOBS_ENDED_FIELD_NUMBER: _ClassVar[int]
    WORKER_RETRIES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    version: str
    engine: str
    uptime_seconds: float
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    max_concurrent_jobs: int
    max_queued_jobs: int
    model_store_bytes: int
    model_store_max_bytes: int
    pending_bytes: int
    jobs_ended: _containers.ScalarMap[str, int]
    worker_retries: int
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    session_steps: int
    def __init__(self, version: _Optional[str] = ..., engine: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., max_concurrent_jobs: _Optional[int] = ..., max_queued_jobs: _Optional[int] = ..., model_store_bytes: _Optional[int] = ..., model_store_max_bytes: _Optional[int] = ..., pending_bytes: _Optional[int] = ..., jobs_ended: _Optional[_Mapping[str, int]] = ..., worker_retries: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ..., session_steps: _Optional[int] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "model_id", "steps", "idle_seconds", "partitions", "replicas")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_id: str
    steps: int
    idle_seconds: float
    partitions: int
    replicas: int
    def __init__(self, session_id: _Optional[str] = ..., model_id: _Optional[str] = ..., steps: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., partitions: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...
