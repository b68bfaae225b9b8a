/* Constants the whole page shares: where the API is, which states are final, page sizes. */

export const API = "/api/v1";
export const TERMINAL_TASK = new Set(["succeeded", "failed", "canceled", "timed_out"]);
export const TERMINAL_RUN = new Set(["succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"]);
export const RUN_ORDER = ["running", "dispatched", "pending", "delayed", "succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"];
export const STATUS_LABEL = { timed_out: "timed out" };
export const LINK_LABEL = { grpc: "gRPC", amqp: "RabbitMQ", ssh: "SSH", local: "Local" };
export const FLEET_PAGE = 100;
export const TASKS_PAGE = 50;
export const RUNS_PAGE = 200;
export const MAX_LINES = 20000; // output lines kept in the page; the full log is a download away
export const SAMPLES = 90; // sparkline points kept per host
