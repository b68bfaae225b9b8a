from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CommandMessage(_message.Message):
    __slots__ = ("command_content", "command_result", "hello", "welcome", "heartbeat", "output", "started", "cancel", "ack", "chunk_request", "file_chunk")
    COMMAND_CONTENT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_RESULT_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    FILE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    command_content: CommandContent
    command_result: CommandResult
    hello: Hello
    welcome: Welcome
    heartbeat: Heartbeat
    output: OutputChunk
    started: Started
    cancel: Cancel
    ack: Ack
    chunk_request: ChunkRequest
    file_chunk: FileChunk
    def __init__(self, command_content: _Optional[_Union[CommandContent, _Mapping]] = ..., command_result: _Optional[_Union[CommandResult, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., output: _Optional[_Union[OutputChunk, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., chunk_request: _Optional[_Union[ChunkRequest, _Mapping]] = ..., file_chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class CommandContent(_message.Message):
    __slots__ = ("task_id", "run_id", "attempt", "command", "parameters", "timeout", "env", "user", "timestamp", "sign", "deliver_by", "target", "manifest", "run_root", "run_index", "run_path")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    DELIVER_BY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RUN_ROOT_FIELD_NUMBER: _ClassVar[int]
    RUN_INDEX_FIELD_NUMBER: _ClassVar[int]
    RUN_PATH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: str
    attempt: int
    command: str
    parameters: str
    timeout: int
    env: _containers.ScalarMap[str, str]
    user: str
    timestamp: float
    sign: str
    deliver_by: float
    target: str
    manifest: FileManifest
    run_root: bytes
    run_index: int
    run_path: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., command: _Optional[str] = ..., parameters: _Optional[str] = ..., timeout: _Optional[int] = ..., env: _Optional[_Mapping[str, str]] = ..., user: _Optional[str] = ..., timestamp: _Optional[float] = ..., sign: _Optional[str] = ..., deliver_by: _Optional[float] = ..., target: _Optional[str] = ..., manifest: _Optional[_Union[FileManifest, _Mapping]] = ..., run_root: _Optional[bytes] = ..., run_index: _Optional[int] = ..., run_path: _Optional[_Iterable[bytes]] = ...) -> None: ...

class FileManifest(_message.Message):
    __slots__ = ("root", "single_file", "files", "directories", "chunk_size", "total_bytes", "owner", "group", "problems")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    SINGLE_FILE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    root: str
    single_file: bool
    files: _containers.RepeatedCompositeFieldContainer[ManifestFile]
    directories: _containers.RepeatedScalarFieldContainer[str]
    chunk_size: int
    total_bytes: int
    owner: str
    group: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, root: _Optional[str] = ..., single_file: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[ManifestFile, _Mapping]]] = ..., directories: _Optional[_Iterable[str]] = ..., chunk_size: _Optional[int] = ..., total_bytes: _Optional[int] = ..., owner: _Optional[str] = ..., group: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class ManifestFile(_message.Message):
    __slots__ = ("path", "size", "mode", "sha256", "chunks")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    mode: int
    sha256: str
    chunks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., mode: _Optional[int] = ..., sha256: _Optional[str] = ..., chunks: _Optional[_Iterable[str]] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("run_id", "task_id", "hashes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("run_id", "hash", "data", "error")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    hash: str
    data: bytes
    error: str
    def __init__(self, run_id: _Optional[str] = ..., hash: _Optional[str] = ..., data: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("task_id", "run_id", "attempt", "status", "exit_code", "stdout", "stderr", "truncated", "error", "started_at", "finished_at", "duration_ms", "timestamp", "signature", "hostname")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    run_id: str
    attempt: int
    status: str
    exit_code: int
    stdout: str
    stderr: str
    truncated: bool
    error: str
    started_at: float
    finished_at: float
    duration_ms: int
    timestamp: float
    signature: str
    hostname: str
    def __init__(self, task_id: _Optional[str] = ..., run_id: _Optional[str] = ..., attempt: _Optional[int] = ..., status: _Optional[str] = ..., exit_code: _Optional[int] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., truncated: _Optional[bool] = ..., error: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., duration_ms: _Optional[int] = ..., timestamp: _Optional[float] = ..., signature: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("hostname", "version", "groups", "labels", "os", "running_run_ids", "finished_run_ids", "public_key", "timestamp", "signature", "abandoned_run_ids", "challenge", "features")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    version: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    os: str
    running_run_ids: _containers.RepeatedScalarFieldContainer[str]
    finished_run_ids: _containers.RepeatedScalarFieldContainer[str]
    public_key: str
    timestamp: float
    signature: str
    abandoned_run_ids: _containers.RepeatedScalarFieldContainer[str]
    challenge: str
    features: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hostname: _Optional[str] = ..., version: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., os: _Optional[str] = ..., running_run_ids: _Optional[_Iterable[str]] = ..., finished_run_ids: _Optional[_Iterable[str]] = ..., public_key: _Optional[str] = ..., timestamp: _Optional[float] = ..., signature: _Optional[str] = ..., abandoned_run_ids: _Optional[_Iterable[str]] = ..., challenge: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("heartbeat_interval_seconds", "server_version", "public_key", "metrics_interval_seconds")
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    METRICS_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_seconds: int
    server_version: str
    public_key: str
    metrics_interval_seconds: int
    def __init__(self, heartbeat_interval_seconds: _Optional[int] = ..., server_version: _Optional[str] = ..., public_key: _Optional[str] = ..., metrics_interval_seconds: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("hostname", "status", "timestamp", "cpu_usage", "memory_usage", "load", "disk_usage", "signature")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DISK_USAGE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    status: str
    timestamp: float
    cpu_usage: float
    memory_usage: float
    load: float
    disk_usage: float
    signature: str
    def __init__(self, hostname: _Optional[str] = ..., status: _Optional[str] = ..., timestamp: _Optional[float] = ..., cpu_usage: _Optional[float] = ..., memory_usage: _Optional[float] = ..., load: _Optional[float] = ..., disk_usage: _Optional[float] = ..., signature: _Optional[str] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("run_id", "task_id", "stream", "seq", "data")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    stream: str
    seq: int
    data: bytes
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., stream: _Optional[str] = ..., seq: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("run_id", "task_id", "started_at", "pid")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    started_at: float
    pid: int
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., started_at: _Optional[float] = ..., pid: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("run_id", "task_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("run_id", "kind")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    kind: str
    def __init__(self, run_id: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...
