/* The state more than one module reads or writes, and nothing else: the session, the
 * current view, the fleet store and the open task. A view's own state stays in its module.
 */

// Who is logged in; loggedOut once a 401 has shown the login form (toasts then stay quiet).
export const auth = { user: null, loggedOut: false };

// The fleet store (fleet.js keeps it current); views subscribe through listeners.
export const fleet = {
  hosts: new Map(),
  samples: new Map(),
  summary: null,
  loaded: false,
  listeners: new Set(),
  pending: new Set(),
  notifyTimer: 0,
  freshDuringLoad: null,
  lastSummaryAt: 0,
  source: null,
  streamBroken: false,
  // The id of the last fleet event: a reconnect resumes from it and gets only the hosts
  // changed meanwhile (a delta), never the whole fleet again.
  lastEventId: "",
};

// The task on screen: task-view.js and task-runs.js both work on it; gen counts the entries,
// so that an answer for a task the user has left is dropped.
export const taskView = {
  id: null,
  task: null,
  runs: new Map(),
  rows: new Map(),
  legend: new Map(),
  runsVersion: 0,
  source: null,
  term: null,
  filter: "",
  page: 1,
  lastStatus: null,
  runsTimer: 0,
  gen: 0,
};

// The view on screen (a ROUTES name in router.js) and how to leave it.
export const current = { name: null, leave: null };
