'use strict';
// The operator console: a few pages over the daemon's JSON API (/v1).
//
// Everything shown goes into the page as text (textContent, or append of a
// string), never as HTML, so event data cannot become markup. The API token
// lives in sessionStorage (this tab only) and goes in an Authorization
// header on every request; nothing relies on a cookie, so another site
// cannot make a request that carries it.

const TOKEN_KEY = 'nexor-webhookd-token';
const STATUSES = ['pending', 'retrying', 'succeeded', 'failed', 'cancelled', 'held'];
// An envelope longer than this is cut on its page: laying out a
// megabyte-long <pre> froze the tab for ten seconds.
const ENVELOPE_SHOWN = 64 * 1024;
const $ = (selector) => document.querySelector(selector);

class Unauthorized extends Error {}

/** An element with attributes (`on…` ones are listeners) and children (strings become text). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') e.className = value;
    else if (key.startsWith('on')) e.addEventListener(key.slice(2), value);
    else e.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) e.append(child instanceof Node ? child : String(child));
  }
  return e;
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  // A daemon that does not answer says so, instead of leaving the page as it was.
  const response = await fetch('/v1' + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
    credentials: 'omit',
    signal: AbortSignal.timeout(20000),
  }).catch((e) => {
    throw new Error(e.name === 'TimeoutError' ? 'The daemon did not answer within 20 s.' : 'The daemon cannot be reached: ' + e.message);
  });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error((data.error && data.error.message) || 'HTTP ' + response.status);
  return data;
}

function notice(text, kind) {
  const n = $('#notice');
  n.className = kind || '';
  n.replaceChildren(...[text].flat());
}

/** `text` with its bidirectional controls written out (`\u202e`), so that
 *  data cannot reorder what is shown (`exe.png` that is really `png.exe`). */
function visible(text) {
  return String(text).replace(/[\u200e\u200f\u202a-\u202e\u2066-\u2069]/g,
    (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function when(rfc3339) {
  return rfc3339 ? rfc3339.replace('T', ' ').replace(/\.\d+Z$|Z$/, ' UTC') : '–';
}

function eventLink(id) {
  return el('a', { href: '#/event/' + encodeURIComponent(id), class: 'mono' }, id);
}

function table(headings, rows, attrs) {
  return el('table', attrs || {},
    el('thead', {}, el('tr', {}, headings.map((h) => el('th', {}, h)))),
    el('tbody', {}, rows));
}

/** What a failed action shows: the sign-in form if the token was refused, else why. */
function actionFailed(e) {
  if (e instanceof Unauthorized) showLogin();
  else notice(e.message, 'error');
}

/** A button that runs `action`, disabled while it runs, then shows what it said. */
function actionButton(label, attrs, action) {
  const b = el('button', { type: 'button', ...attrs }, label);
  b.addEventListener('click', async () => {
    b.disabled = true;
    try {
      await action();
    } catch (e) {
      actionFailed(e);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

// Pages ---------------------------------------------------------------

async function overviewPage() {
  const o = await api('GET', '/overview');
  const h = o.last_hour;
  const rate = h.success_rate === null ? '–' : (h.success_rate * 100).toFixed(1) + ' %';
  const tile = (label, value, id) => el('div', { class: 'tile', id }, el('span', {}, label), el('strong', {}, value));
  return el('div', {},
    el('h1', {}, 'Overview'),
    el('p', { class: 'muted' }, 'The last hour, counted since the daemon started (at most an hour back).'),
    el('div', { class: 'tiles' },
      tile('Accepted', h.accepted, 'accepted'),
      tile('Delivered', h.delivered, 'delivered'),
      tile('Failed', h.failed, 'failed'),
      tile('Success rate', rate, 'success-rate'),
      tile('Deliveries due', o.deliveries_due, 'due'),
      tile('Paused webhooks', o.paused_webhooks + ' of ' + o.webhooks, 'paused')),
    chart(o.minutes));
}

/** Accepted, delivered and failed per minute, as three lines. */
function chart(minutes) {
  const svgNs = 'http://www.w3.org/2000/svg';
  const [width, height, pad] = [720, 180, 24];
  const svg = document.createElementNS(svgNs, 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', 'Per minute over the last hour: accepted, delivered, failed');
  const series = ['accepted', 'delivered', 'failed'];
  const top = Math.max(1, ...minutes.flatMap((m) => series.map((s) => m[s])));
  const x = (i) => pad + (i * (width - 2 * pad)) / Math.max(1, minutes.length - 1);
  const y = (v) => height - pad - (v * (height - 2 * pad)) / top;
  const axis = document.createElementNS(svgNs, 'line');
  for (const [k, v] of Object.entries({ x1: pad, x2: width - pad, y1: height - pad, y2: height - pad, class: 'axis' })) {
    axis.setAttribute(k, v);
  }
  svg.append(axis);
  for (const s of series) {
    const line = document.createElementNS(svgNs, 'polyline');
    line.setAttribute('points', minutes.map((m, i) => `${x(i)},${y(m[s])}`).join(' '));
    line.setAttribute('class', 'line ' + s);
    svg.append(line);
  }
  const label = document.createElementNS(svgNs, 'text');
  label.setAttribute('x', pad);
  label.setAttribute('y', 14);
  label.textContent = 'per minute, peak ' + top;
  svg.append(label);
  const legend = el('p', { class: 'legend' }, series.map((s) => el('span', { class: s }, s)));
  return el('figure', {}, svg, legend);
}

async function webhooksPage() {
  const { webhooks } = await api('GET', '/webhooks');
  const rows = webhooks.map((w) => {
    const h = w.health;
    const rate = h.recent_success_rate === null ? '' : ` · ${(h.recent_success_rate * 100).toFixed(0)} % of the last ${h.recent_attempts}`;
    const state = !w.enabled ? 'disabled' : w.state;
    const act = async (what) => {
      const r = await api('POST', `/webhooks/${w.id}/${what}`);
      notice(what === 'pause' ? `Webhook ${w.id} paused.` : `Webhook ${w.id} resumed; ${r.released} held deliveries released.`);
      await route();
    };
    const test = async () => {
      const r = await api('POST', `/webhooks/${w.id}/test`);
      notice(['Test event ', eventLink(r.event_id), ' sent.']);
    };
    return el('tr', { 'data-webhook': w.id },
      el('td', { class: 'mono' }, w.id),
      el('td', { class: 'mono' }, w.client_id),
      el('td', { class: 'url' }, w.url),
      el('td', {}, w.events.join(', ')),
      el('td', {}, el('span', { class: 'badge ' + state }, state), w.paused_reason ? ` (${w.paused_reason})` : ''),
      el('td', { class: 'health' },
        `${h.consecutive_failures} failing in a row${rate}`, el('br'),
        'last success ', when(h.last_success_at), el('br'),
        h.last_failure ? 'last error: ' + h.last_failure : 'no error'),
      el('td', { class: 'actions' },
        actionButton('Test', { 'data-action': 'test', disabled: !w.enabled }, test),
        w.state === 'paused'
          ? actionButton('Resume', { 'data-action': 'resume' }, () => act('resume'))
          : actionButton('Pause', { 'data-action': 'pause' }, () => act('pause'))));
  });
  return el('div', {},
    el('h1', {}, 'Webhooks'),
    el('p', { class: 'muted' }, 'Configured in the TOML file; secrets are never shown.'),
    rows.length
      ? table(['Webhook', 'Client', 'URL', 'Events', 'State', 'Health', ''], rows, { id: 'webhooks' })
      : el('p', { id: 'no-webhooks' }, 'No webhooks are configured: add them to the TOML file and reload.'));
}

async function eventsPage(query) {
  const params = new URLSearchParams(query || '');
  const shown = new URLSearchParams();
  for (const key of ['event_id', 'client_id', 'event_type', 'status', 'cursor']) {
    if (params.get(key)) shown.set(key, params.get(key));
  }
  // Bad filter values are named by the API; the form stays to fix them.
  let page = { events: [], next_cursor: null, searched_to: null };
  let problem = null;
  try {
    page = await api('GET', '/events?' + shown.toString());
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
    problem = el('p', { class: 'error', role: 'alert', id: 'filter-error' }, e.message);
  }
  const field = (name, label, attrs) => el('label', {}, label, el('input', { name, value: params.get(name) || '', ...attrs }));
  const status = el('select', { name: 'status' }, el('option', { value: '' }, 'any'),
    STATUSES.map((s) => el('option', { value: s, selected: params.get('status') === s }, s)));
  const form = el('form', { id: 'filters', class: 'filters' },
    field('event_id', 'Event id', { size: 36 }),
    field('client_id', 'Client id', { size: 36 }),
    field('event_type', 'Event type', { placeholder: 'meeting.scheduled' }),
    el('label', {}, 'Delivery status', status),
    el('button', { type: 'submit' }, 'Filter'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v.trim()) q.set(k, v.trim());
    location.hash = '#/events' + (q.toString() ? '?' + q : '');
  });
  const rows = page.events.map((e) => el('tr', { 'data-event': e.event_id },
    el('td', {}, when(e.timestamp)),
    el('td', {}, eventLink(e.event_id), e.test ? el('span', { class: 'badge test' }, 'test') : ''),
    el('td', {}, e.event_type),
    el('td', { class: 'mono' }, e.client_id),
    el('td', {}, e.deliveries.map((d) => el('span', { class: 'badge ' + d.status, title: d.webhook_id }, d.status)))));
  const more = [];
  if (page.next_cursor) {
    const next = new URLSearchParams(shown);
    next.set('cursor', page.next_cursor);
    more.push(el('a', { href: '#/events?' + next, id: 'older' }, 'Older →'));
  }
  if (shown.has('cursor')) {
    const first = new URLSearchParams(shown);
    first.delete('cursor');
    more.push(el('a', { href: '#/events?' + first, id: 'newest' }, '↖ Newest'));
  }
  const searched = page.searched_to && page.next_cursor ? `Searched back to ${when(page.searched_to)}.` : '';
  return el('div', {},
    el('h1', {}, 'Events'),
    form,
    problem,
    page.events.length ? table(['Time', 'Event', 'Type', 'Client', 'Deliveries'], rows, { id: 'events' })
      : el('p', { class: 'muted', id: 'no-events' }, 'No events here.'),
    el('p', { class: 'pager' }, searched, ' ', more));
}

async function eventPage(id) {
  const e = await api('GET', '/events/' + encodeURIComponent(id));
  const envelope = {
    event_type: e.event_type, event_id: e.event_id, client_id: e.client_id,
    timestamp: e.timestamp, test: e.test, data: e.data,
  };
  let shown = JSON.stringify(envelope, null, 2);
  if (shown.length > ENVELOPE_SHOWN) {
    shown = shown.slice(0, ENVELOPE_SHOWN) + `\n… the first ${ENVELOPE_SHOWN} of ${shown.length} characters; the API has it all (GET /v1/events/${e.event_id}).`;
  }
  const redeliver = actionButton('Redeliver', { id: 'redeliver' }, async () => {
    const r = await api('POST', `/events/${encodeURIComponent(id)}/redeliver`);
    notice(`${r.requeued} failed or cancelled deliveries queued again` + (r.skipped_disabled ? `; ${r.skipped_disabled} to removed or disabled webhooks skipped.` : '.'));
    await route();
  });
  const deliveries = e.deliveries.map((d) => el('section', { class: 'delivery', 'data-webhook': d.webhook_id },
    el('h2', {}, 'To webhook ', el('span', { class: 'mono' }, d.webhook_id), ' ', el('span', { class: 'badge ' + d.status }, d.status)),
    d.next_attempt_at ? el('p', {}, 'Next attempt ', when(d.next_attempt_at)) : '',
    d.attempts.length
      ? table(['Started', 'Delivery id', 'Status', 'Error', 'Took', 'Response'], d.attempts.map((a) => el('tr', {},
        el('td', {}, when(a.started_at)),
        el('td', { class: 'mono' }, a.delivery_id),
        el('td', {}, a.status_code === undefined ? '–' : a.status_code),
        el('td', {}, a.error || ''),
        el('td', {}, a.duration_ms + ' ms'),
        el('td', {}, el('code', {}, visible(a.response_body))))), { class: 'attempts' })
      : el('p', { class: 'muted' }, 'Not attempted yet.')));
  return el('div', {},
    el('h1', {}, 'Event ', el('span', { class: 'mono' }, e.event_id)),
    el('p', {}, redeliver, ' sends every failed or cancelled delivery again, with a new delivery id.'),
    el('h2', {}, 'Envelope'),
    el('pre', { id: 'envelope' }, visible(shown)),
    deliveries.length ? deliveries : el('p', { class: 'muted' }, 'No webhook was subscribed.'));
}

async function recoverPage() {
  const { webhooks } = await api('GET', '/webhooks');
  if (!webhooks.length) {
    return el('div', {}, el('h1', {}, 'Recover'), el('p', { id: 'no-webhooks' }, 'No webhooks are configured.'));
  }
  const hourAgo = new Date(Date.now() - 3600e3).toISOString().replace(/\.\d+Z$/, 'Z');
  const form = el('form', { id: 'recover', class: 'filters' },
    el('label', {}, 'Webhook', el('select', { name: 'webhook' }, webhooks.map((w) => el('option', { value: w.id }, `${w.id} · ${w.url}`)))),
    el('label', {}, 'Failed since (RFC 3339)', el('input', { name: 'since', value: hourAgo, size: 24 })),
    el('button', { type: 'submit' }, 'Send again'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    try {
      const q = new URLSearchParams({ since: data.get('since') });
      const r = await api('POST', `/webhooks/${data.get('webhook')}/recover?${q}`);
      notice(`${r.requeued} failed deliveries since ${when(r.since)} queued again.`);
    } catch (e) {
      actionFailed(e);
    }
  });
  return el('div', {},
    el('h1', {}, 'Recover'),
    el('p', { class: 'muted' }, "Sends a webhook's failed deliveries again, of events received since the given time."),
    form);
}

// Routing and sign-in -------------------------------------------------

const routes = [
  [/^#?\/?$/, overviewPage],
  [/^#\/webhooks$/, webhooksPage],
  [/^#\/events(?:\?(.*))?$/, eventsPage],
  [/^#\/event\/([0-9a-fA-F-]{36})$/, eventPage],
  [/^#\/recover$/, recoverPage],
];

let shownRoute = 0;

async function route() {
  const mine = ++shownRoute;
  const hash = location.hash || '#/';
  const found = routes.map(([re, render]) => [hash.match(re), render]).find(([m]) => m);
  try {
    const content = found ? await found[1](...found[0].slice(1)) : el('p', { class: 'error' }, 'No such page.');
    if (mine !== shownRoute) return;
    $('#login').hidden = true;
    $('#nav').hidden = false;
    $('#page').replaceChildren(content);
  } catch (e) {
    if (mine !== shownRoute) return;
    if (e instanceof Unauthorized) return showLogin();
    $('#page').replaceChildren(el('p', { class: 'error', role: 'alert' }, e.message));
  }
}

function showLogin() {
  $('#nav').hidden = true;
  $('#page').replaceChildren();
  notice('');
  $('#login').hidden = false;
  $('#token').focus();
}

document.addEventListener('DOMContentLoaded', () => {
  $('#login').addEventListener('submit', async (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $('#token').value);
    $('#token').value = '';
    try {
      await api('GET', '/overview');
      $('#login-error').textContent = '';
      await route();
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      $('#login-error').textContent = err instanceof Unauthorized ? 'That token was refused.' : err.message;
    }
  });
  $('#signout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    // A page still loading must not show up after this.
    shownRoute++;
    showLogin();
  });
  window.addEventListener('hashchange', () => {
    notice('');
    route();
  });
  route();
});
