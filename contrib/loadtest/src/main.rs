//! `loadtest`: measures the real `nexor-webhookd` binary the way it is used,
//! over loopback HTTP, and prints a human summary followed by one JSON line.
//!
//! Each run makes a private temp directory, writes a config there and starts
//! the daemon found next to this executable (`--daemon` overrides) as its own
//! process. This process plays both other parts: a receiver (axum on its own
//! one-thread runtime) that answers deliveries, and a load generator (one
//! thread driving many clients, each with its own keep-alive connection)
//! that posts events to `/v1/events`. Every event carries its send time
//! (nanoseconds since a process-local epoch) in `data.sent_ns`, so the
//! receiver measures ingest→arrival latency from the same clock, and records
//! each `(event_id, webhook_id)` it is handed, so every acknowledged event
//! can be checked to have arrived exactly once per webhook. Daemon CPU time and
//! memory come from `/proc/PID`, disk use from the storage directory after a
//! clean stop. Scenarios: `throughput` (also measures the raw loopback POST
//! ceiling of the same clients first, so the figure means something on the
//! machine at hand), `latency` (paced load), `fanout` (many webhooks per
//! event), `backlog` (deliveries piling up behind a receiver that is down,
//! a restart, then the drain once it is back and they are recovered),
//! `isolation` (healthy webhooks next to hanging ones, against a run without
//! the hanging ones), `soak` (a long paced load at a webhook that fails a
//! random share of attempts, with a short retention: does the daemon's
//! footprint and latency stay flat?) and `churn` (as many events as fast as
//! possible with a very short retention: does sled's disk use plateau?).
//!
//! `soak` and `churn` also sample while the load runs, every `--sample`
//! seconds: the daemon's RSS and open file descriptors from `/proc/PID`, the
//! storage directory's disk use, events acknowledged so far and within the
//! last retention period (about what retention cannot delete yet), and the
//! ingest→arrival and 202 latencies of that interval alone. Each sample is
//! printed as it is taken and the series ends up in the summary and the JSON
//! line, with a verdict on whether it levelled off.
//!
//! Everything is bounded: fixed counts or durations, and waiting for
//! deliveries ends after `--stall` without a new arrival.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use clap::{Parser, ValueEnum};
use http_body_util::BodyExt;
use nexor_webhookd_harness::{Process, Server, Stopped};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

// The daemon's allocator, so the load generator's share of the machine is
// no bigger than it has to be.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Size of each event's `data` object, about what a real Nexor event carries.
const DATA_BYTES: usize = 700;
/// How long the daemon gets to become healthy; opening a large store takes time.
const START_LIMIT: Duration = Duration::from_secs(120);
/// How long the daemon gets to exit on SIGTERM before it is killed: more than
/// its default grace periods (10 s for open requests, then 10 s for attempts).
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long a `/hang/` request is held: far beyond any delivery timeout used
/// here, so the daemon always gives up first.
const HANG_HOLD: Duration = Duration::from_secs(60);
/// Per-phase timeout of the load clients: generous, so a slow daemon shows up
/// as latency rather than as errors.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Benchmark nexor-webhookd on loopback: starts the daemon, a receiver and a load generator"
)]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Events to post [default: throughput 100000, fanout 2000, backlog 200000, churn 3000000]
    #[arg(long)]
    events: Option<u64>,
    /// Events per second of paced load [default: latency 1000, isolation 20, soak 500]
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds of paced load [default: latency 20, isolation 10, soak 1800]
    #[arg(long)]
    seconds: Option<u64>,
    /// Seconds between samples while the load runs [default: soak 60, churn 15]
    #[arg(long)]
    sample: Option<u64>,
    /// The daemon's `[storage] retention` [default: soak 5m, churn 20s]
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// Share of soak delivery attempts the receiver answers 503 (never all of
    /// one delivery's attempts, so each still arrives)
    #[arg(long, default_value_t = 0.2)]
    fail_rate: f64,
    /// Concurrent clients, each with its own connection [default: 64, or 16 for paced load]
    #[arg(long)]
    clients: Option<usize>,
    /// Webhooks [default: fanout 100, isolation 4 (half of them hang)]
    #[arg(long)]
    webhooks: Option<usize>,
    /// The daemon's `[delivery] workers`
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// The daemon's `[delivery] per_webhook_in_flight` [default: the daemon's]
    #[arg(long)]
    per_webhook: Option<usize>,
    /// Seconds spent measuring the raw loopback POST ceiling (throughput)
    #[arg(long, default_value_t = 5)]
    ceiling_seconds: u64,
    /// Stop waiting for deliveries after this long without a new arrival
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    stall: Duration,
    /// The daemon binary [default: nexor-webhookd next to this executable]
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Keep the temp directory (configs, storage, daemon logs) afterwards
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    Throughput,
    Latency,
    Fanout,
    Backlog,
    Isolation,
    Soak,
    Churn,
}

fn scenario_name(s: Scenario) -> String {
    format!("{s:?}").to_lowercase()
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            report.print();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Report> {
    let bench = Bench::new(args)?;
    let mut report = Report::new(args, &bench);
    let result = match args.scenario {
        Scenario::Throughput => throughput(&bench, &mut report),
        Scenario::Latency => latency(&bench, &mut report),
        Scenario::Fanout => fanout(&bench, &mut report),
        Scenario::Backlog => backlog(&bench, &mut report),
        Scenario::Isolation => isolation(&bench, &mut report),
        Scenario::Soak => soak(&bench, &mut report),
        Scenario::Churn => churn(&bench, &mut report),
    };
    if let Err(e) = result {
        bench.work.keep();
        return Err(e.context(format!(
            "{} failed; configs and daemon logs kept in {}",
            scenario_name(args.scenario),
            bench.work.path.display()
        )));
    }
    if args.keep {
        bench.work.keep();
        report.say(format!("files kept in {}", bench.work.path.display()));
    }
    Ok(report)
}

// ---------------------------------------------------------------- scenarios

/// Delivery settings for receivers that answer at once: retries come soon, so
/// a transient failure shows up as latency instead of a lost event.
const PROMPT: Settings = Settings { timeout: "10s", retry_schedule: &["1s", "5s"], retention: None };

fn throughput(b: &Bench, r: &mut Report) -> Result<()> {
    let events = b.args.events.unwrap_or(100_000);
    let clients = b.clients(64);

    // Measured first, with no daemon running, so the ceiling is what these
    // clients and this receiver manage on this machine with both cores free.
    let secs = b.args.ceiling_seconds;
    eprintln!("ceiling: {clients} clients posting straight to the receiver for {secs} s");
    let ceiling =
        generate(&b.receiver.url("/raw"), clients, Plan::For(Duration::from_secs(secs)), &b.body, 200, None);
    let ceiling_per_s = per_s(ceiling.answered, ceiling.end_ns - ceiling.start_ns);
    r.set("ceiling_per_s", round(ceiling_per_s, 1));
    r.say(format!(
        "raw loopback POST ceiling: {ceiling_per_s:.0}/s ({clients} clients, {secs} s, same body, no daemon){}",
        failures_note(&ceiling.failed)
    ));
    b.receiver.take();

    let hooks = b.hooks(&[(Mode::Ok, 1)]);
    let mut d = b.daemon("throughput", &hooks, &PROMPT)?;
    let run = measure(b, &d, Plan::Count(events), clients, &hooks)?;
    report_run(r, "", "through the daemon, as fast as it acknowledges", &run);
    finish(&mut d, r, "", run.acked)?;
    let ratio = run.acked_per_s() / ceiling_per_s;
    let delivered_ratio = run.delivered_per_s() / ceiling_per_s;
    r.set("ratio", round(ratio, 3));
    r.set("delivered_ratio", round(delivered_ratio, 3));
    r.say(format!("against the ceiling: acknowledged {ratio:.3}, delivered {delivered_ratio:.3}"));
    Ok(())
}

fn latency(b: &Bench, r: &mut Report) -> Result<()> {
    let plan = b.paced(1000, 20);
    let hooks = b.hooks(&[(Mode::Ok, 1)]);
    let mut d = b.daemon("latency", &hooks, &PROMPT)?;
    let run = measure(b, &d, plan, b.clients(16), &hooks)?;
    report_run(r, "", "paced load, one webhook", &run);
    finish(&mut d, r, "", run.acked)
}

fn fanout(b: &Bench, r: &mut Report) -> Result<()> {
    let events = b.args.events.unwrap_or(2_000);
    let hooks = b.hooks(&[(Mode::Ok, b.args.webhooks.unwrap_or(100))]);
    let mut d = b.daemon("fanout", &hooks, &PROMPT)?;
    let run = measure(b, &d, Plan::Count(events), b.clients(64), &hooks)?;
    report_run(r, "", &format!("{} webhooks per event, as fast as possible", hooks.len()), &run);
    finish(&mut d, r, "", run.acked)
}

fn backlog(b: &Bench, r: &mut Report) -> Result<()> {
    let events = b.args.events.unwrap_or(200_000);
    // With no retries every delivery is `failed` after its one 503: stored,
    // kept, and what `recover` sends again once the receiver is back.
    let hooks = b.hooks(&[(Mode::Down, 1)]);
    let settings = Settings { timeout: "10s", retry_schedule: &[], ..PROMPT };
    let since = rfc3339_now()?;
    let mut d = b.daemon("backlog", &hooks, &settings)?;
    let run = measure(b, &d, Plan::Count(events), b.clients(64), &hooks)?;
    report_run(r, "", "receiver answering 503, no retries", &run);
    r.say(format!(
        "backlog: {} deliveries failed and wait to be recovered ({} of {} acknowledged events not attempted)",
        run.refused,
        run.acked.saturating_sub(run.refused),
        run.acked
    ));
    finish(&mut d, r, "", run.acked)?;

    eprintln!("restarting the daemon on the backlog");
    let took = d.launch()?;
    // Give the dispatcher a moment to load whatever it loads on start.
    std::thread::sleep(Duration::from_secs(1));
    let after = d.proc()?;
    r.set("restart_ms", round(ms(took), 1));
    r.set("restart_rss_mb", round(mb(after.rss_bytes), 1));
    r.say(format!(
        "restart: healthy {:.0} ms after spawn, RSS {:.1} MB one second later",
        ms(took),
        mb(after.rss_bytes)
    ));
    let early = b.receiver.take();
    r.set("arrivals_after_restart", early.arrivals());
    if early.arrivals() > 0 {
        r.warn(format!("{} deliveries arrived after the restart, before any recover call", early.arrivals()));
    }

    console_reads(&d.base, r, "console_")?;

    b.receiver.bring_up();
    let url = format!("{}/v1/webhooks/{}/recover?since={since}", d.base, hooks[0].id);
    eprintln!("receiver up; recovering the failed deliveries");
    let before = d.proc()?;
    let start = now_ns();
    let answer = post_json(&url)?;
    let call_ms = (now_ns() - start) as f64 / 1e6;
    let requeued = answer["requeued"].as_u64().unwrap_or(0);
    // A Prometheus scrape while the requeued deliveries wait: its cost must
    // not grow with them.
    let start = now_ns();
    let metrics = get_text(&format!("{}/metrics", d.base))?;
    let scrape_ms = (now_ns() - start) as f64 / 1e6;
    let due: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nexor_webhookd_deliveries_due "))
        .and_then(|v| v.trim().parse().ok())
        .context("no nexor_webhookd_deliveries_due in /metrics")?;
    // The console's first page while every recovered delivery is due.
    let (median, slowest) = timed_gets(&format!("{}/v1/overview", d.base))?;
    r.set("console_overview_while_due_ms", round(slowest, 1));
    r.say(format!(
        "console: /v1/overview with the backlog due: median {median:.1} ms, slowest {slowest:.1} ms"
    ));
    r.set("metrics_scrape_ms", round(scrape_ms, 1));
    r.set("metrics_due", due);
    r.say(format!("metrics: /metrics answered in {scrape_ms:.0} ms with {due} deliveries due"));
    let complete = b.receiver.wait(run.refused, b.args.stall);
    let cpu = d.proc()?.cpu.since(before.cpu);
    let peak = d.proc()?.peak_rss_bytes;
    let tally = b.receiver.take();
    let drained = tally.delivered.len() as u64;
    let drain_ns = tally.last_ns.saturating_sub(start);
    r.set("requeued", requeued);
    r.set("recover_call_ms", round(call_ms, 1));
    r.set("drained", drained);
    r.set("drain_s", round(drain_ns as f64 / 1e9, 2));
    r.set("drain_per_s", round(per_s(drained, drain_ns), 1));
    r.set("drain_duplicates", tally.duplicates);
    r.set("drain_cpu_s", round(cpu.total(), 2));
    r.set("drain_peak_rss_mb", round(mb(peak), 1));
    r.say(format!(
        "drain: recover requeued {requeued} in {call_ms:.0} ms; {drained} of {} delivered {:.2} s after the call = {:.0}/s; {} duplicates; daemon {:.2} s CPU, peak RSS {:.1} MB",
        run.refused,
        drain_ns as f64 / 1e9,
        per_s(drained, drain_ns),
        tally.duplicates,
        cpu.total(),
        mb(peak)
    ));
    if !complete || drained < run.refused {
        r.warn(format!("drain: {} recovered deliveries never arrived", run.refused.saturating_sub(drained)));
    }
    finish(&mut d, r, "restarted_", run.acked)
}

/// What each console page reads, asked five times each on the stored
/// backlog: the median and the slowest answer, in ms.
fn console_reads(base: &str, r: &mut Report, prefix: &str) -> Result<()> {
    let first: Value = serde_json::from_str(&get_text(&format!("{base}/v1/events?limit=1"))?)?;
    let event = first["events"][0]["event_id"].as_str().context("no event listed")?.to_owned();
    // A client no event belongs to: the events page's worst case, a filter
    // that matches nothing.
    let nobody = "00000000-0000-4000-8000-000000000000";
    let reads = [
        ("overview", "/v1/overview".to_owned()),
        ("webhooks", "/v1/webhooks".to_owned()),
        ("events", "/v1/events".to_owned()),
        ("events_failed", "/v1/events?status=failed".to_owned()),
        ("events_no_match", format!("/v1/events?client_id={nobody}")),
        ("events_by_id", format!("/v1/events?event_id={event}")),
        ("event", format!("/v1/events/{event}")),
        ("page", "/ui/app.js".to_owned()),
    ];
    for (name, path) in reads {
        let (median, slowest) = timed_gets(&format!("{base}{path}"))?;
        r.set(&format!("{prefix}{name}_ms"), round(slowest, 1));
        r.say(format!("console: {path}: median {median:.1} ms, slowest {slowest:.1} ms"));
    }
    Ok(())
}

/// GETs `url` five times; the median and the slowest, in ms.
fn timed_gets(url: &str) -> Result<(f64, f64)> {
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = now_ns();
        get_text(url)?;
        took.push((now_ns() - start) as f64 / 1e6);
    }
    took.sort_by(f64::total_cmp);
    Ok((took[2], took[4]))
}

fn isolation(b: &Bench, r: &mut Report) -> Result<()> {
    let plan = b.paced(20, 10);
    let clients = b.clients(16);
    let n = b.args.webhooks.unwrap_or(4).max(2);
    let (healthy, hanging) = (n - n / 2, n / 2);
    // One short timeout for both runs, so the only difference between them is
    // whether the hanging webhooks exist; retries out of reach keep each
    // hanging delivery to one attempt.
    let settings = Settings { timeout: "2s", retry_schedule: &["1h"], ..PROMPT };

    let hooks = b.hooks(&[(Mode::Ok, healthy)]);
    let mut d = b.daemon("isolation-baseline", &hooks, &settings)?;
    let base = measure(b, &d, plan, clients, &hooks)?;
    report_run(r, "baseline_", &format!("baseline: {healthy} healthy webhooks alone"), &base);
    finish(&mut d, r, "baseline_", base.acked)?;

    let hooks = b.hooks(&[(Mode::Ok, healthy), (Mode::Hang, hanging)]);
    let mut d = b.daemon("isolation", &hooks, &settings)?;
    let run = measure(b, &d, plan, clients, &hooks)?;
    report_run(
        r,
        "",
        &format!("{healthy} healthy webhooks next to {hanging} that hang past the 2 s timeout"),
        &run,
    );
    finish(&mut d, r, "", run.acked)?;
    let ratio = run.arrival.p99 / base.arrival.p99;
    r.set("p99_ratio", round(ratio, 2));
    r.say(format!(
        "healthy p99 with hanging neighbours / without: {:.1} ms / {:.1} ms = {ratio:.1}x",
        run.arrival.p99, base.arrival.p99
    ));
    Ok(())
}

fn soak(b: &Bench, r: &mut Report) -> Result<()> {
    let plan = b.paced(500, 1800);
    let every = b.sample_every(60);
    let retention = b.args.retention.unwrap_or(Duration::from_secs(300));
    let fail_rate = b.args.fail_rate;
    if !(0.0..=1.0).contains(&fail_rate) {
        bail!("--fail-rate {fail_rate} is not a fraction from 0 to 1");
    }
    // Short delays keep the retry backlog small and bounded (a delivery waits
    // 36 s at most), and the receiver never refuses a delivery more often than
    // it has retries, so every one arrives: a missing one is the daemon's.
    let settings =
        Settings { timeout: "10s", retry_schedule: &["1s", "5s", "30s"], retention: Some(retention) };
    let cap = settings.retry_schedule.len();
    b.receiver.make_flaky(fail_rate, cap);
    report_settings(r, &settings, b.args.workers);
    r.set("fail_rate", fail_rate);
    r.say(format!(
        "receiver: answers 503 to {:.0}% of attempts at random, at most {cap} times per delivery",
        100.0 * fail_rate
    ));

    let hooks = b.hooks(&[(Mode::Flaky, 1)]);
    let mut d = b.daemon("soak", &hooks, &settings)?;
    let mut series = Series::new(retention);
    let run =
        measure_sampled(b, &d, plan, b.clients(16), &hooks, Some((every, &mut |p| series.take(b, &d, p))))?;
    report_run(r, "", "steady paced load, one webhook failing at random", &run);
    let attempts = run.flaked + run.delivered + run.duplicates;
    let share = run.flaked as f64 / attempts.max(1) as f64;
    r.set("fail_share", round(share, 4));
    r.say(format!("  {:.1}% of {attempts} attempts answered 503 on purpose", 100.0 * share));

    let samples = &series.samples;
    report_series(r, samples, every);
    // Disk use, and with it sled's cache, can only level off once events start
    // leaving, a retention period (and a pruning pass) after the first came.
    let premature = thirds(samples).is_none_or(|(middle, _)| middle[0].elapsed_s < retention.as_secs_f64());
    let figure = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let verdicts = [
        ("trend_rss_mb", "RSS MB", figure(|s| mb(s.rss)), FLAT_FOOTPRINT, premature),
        ("trend_fds", "open fds", figure(|s| s.fds as f64), FLAT_FOOTPRINT, false),
        ("trend_disk_mb", "disk MB", figure(|s| mb(s.disk)), FLAT_FOOTPRINT, premature),
        ("trend_arrival_p50_ms", "ingest→arrival p50 ms", figure(|s| s.arrival.p50), FLAT_LATENCY, false),
        ("trend_arrival_p99_ms", "ingest→arrival p99 ms", figure(|s| s.arrival.p99), FLAT_LATENCY, false),
        ("trend_ack_p99_ms", "202 p99 ms", figure(|s| s.ack.p99), FLAT_LATENCY, false),
    ]
    .map(|(key, label, xs, limit, premature)| (label, report_trend(r, key, label, &xs, limit, premature)));
    let which = |v: Option<bool>| -> Vec<&str> {
        verdicts.iter().filter(|(_, flat)| *flat == v).map(|(label, _)| *label).collect()
    };
    let (growing, unjudged) = (which(Some(false)), which(None));
    let flat = (unjudged.len() < verdicts.len()).then_some(growing.is_empty());
    let unjudged =
        if unjudged.is_empty() { String::new() } else { format!("; not judged: {}", unjudged.join(", ")) };
    r.set("flat", flat);
    match flat {
        None => r.warn("soak: too few samples for a verdict; run for at least nine sample intervals"),
        Some(true) => r.say(format!("verdict: flat{unjudged}")),
        Some(false) => {
            r.say(format!("verdict: growing ({}){unjudged}", growing.join(", ")));
            r.warn(format!("soak: not flat: {}", growing.join(", ")));
        }
    }
    finish(&mut d, r, "", run.acked)
}

fn churn(b: &Bench, r: &mut Report) -> Result<()> {
    let events = b.args.events.unwrap_or(3_000_000);
    let every = b.sample_every(15);
    let retention = b.args.retention.unwrap_or(Duration::from_secs(20));
    let settings = Settings { retention: Some(retention), ..PROMPT };
    report_settings(r, &settings, b.args.workers);

    let hooks = b.hooks(&[(Mode::Ok, 1)]);
    let mut d = b.daemon("churn", &hooks, &settings)?;
    let mut series = Series::new(retention);
    let run = measure_sampled(
        b,
        &d,
        Plan::Count(events),
        b.clients(64),
        &hooks,
        Some((every, &mut |p| series.take(b, &d, p))),
    )?;
    report_run(r, "", "as fast as possible through a fast receiver, short retention", &run);

    let samples = &series.samples;
    report_series(r, samples, every);
    // Maxima rather than averages: sled grows its files in steps and reuses
    // the space freed, so a plateau shows as a ceiling that stops rising.
    let max_disk = |s: &[Sample]| s.iter().map(|s| s.disk).max().unwrap_or(0);
    match thirds(samples) {
        Some((middle, last)) => {
            let ratio = max_disk(last) as f64 / max_disk(middle).max(1) as f64;
            let plateaued = ratio <= FLAT_FOOTPRINT.ratio;
            // What each event that retention cannot delete yet costs on disk, once settled.
            let per_live = last.iter().map(Sample::disk_per_live).sum::<f64>() / last.len() as f64;
            r.set("disk_plateau_ratio", round(ratio, 3));
            r.set("disk_plateaued", plateaued);
            r.set("disk_bytes_per_live_event", round(per_live, 1));
            r.say(format!(
                "disk: max {:.1} MB over the last third of samples / {:.1} MB over the middle third = {ratio:.3}: {}",
                mb(max_disk(last)),
                mb(max_disk(middle)),
                if plateaued { "plateaued" } else { "still growing" }
            ));
            r.say(format!("disk per live event (last third, live = acknowledged within the retention period): {per_live:.0} bytes"));
            if !plateaued {
                r.warn(format!("churn: disk still growing ({ratio:.2}x from the middle to the last third)"));
            }
        }
        None => r.warn("churn: too few samples for a plateau verdict; use more events or a shorter --sample"),
    }
    finish(&mut d, r, "", run.acked)
}

// ----------------------------------------------------- one load, one daemon

/// What one load against one daemon produced, as every scenario reports it.
struct Run {
    posted: u64,
    clients: usize,
    acked: u64,
    failed: BTreeMap<String, u64>,
    /// From the first send to the last acknowledgement.
    acked_ns: u64,
    max_lag_ms: f64,
    /// Acknowledged events × healthy webhooks.
    expected: u64,
    /// Distinct (event, webhook) pairs of acknowledged events answered 200.
    delivered: u64,
    duplicates: u64,
    unacked_delivered: u64,
    unreadable: u64,
    refused: u64,
    hung: u64,
    /// `/flaky/` attempts answered 503 on purpose (each retried).
    flaked: u64,
    /// From the first send to the last 200 or 503.
    delivered_ns: u64,
    ack: Dist,
    arrival: Dist,
    /// Daemon CPU over the run, in all and by thread group.
    cpu: Cpu,
    threads_cpu: Vec<(String, Cpu)>,
    /// This process's CPU (clients and receiver) over the same time.
    bench_cpu: Cpu,
    /// The whole machine over the same time: how busy, how many switches.
    machine: Machine,
    wall_s: f64,
    proc: ProcStats,
    /// Whether every expected arrival came before the stall limit.
    complete: bool,
}

impl Run {
    fn acked_per_s(&self) -> f64 {
        per_s(self.acked, self.acked_ns)
    }
    fn delivered_per_s(&self) -> f64 {
        per_s(self.delivered, self.delivered_ns)
    }
}

/// Posts `plan` to the daemon, waits until every webhook has had its
/// attempt of every acknowledged event (or arrivals stall), and tallies.
fn measure(b: &Bench, d: &Daemon, plan: Plan, clients: usize, hooks: &[Hook]) -> Result<Run> {
    measure_sampled(b, d, plan, clients, hooks, None)
}

/// How often to sample while a load runs, and what to do with each sample.
type Sampler<'s> = (Duration, &'s mut dyn FnMut(Progress) -> Result<()>);

/// [`measure`], calling the sampler at its interval while the load runs.
fn measure_sampled(
    b: &Bench,
    d: &Daemon,
    plan: Plan,
    clients: usize,
    hooks: &[Hook],
    sampler: Option<Sampler>,
) -> Result<Run> {
    let per_event = |m: Mode| hooks.iter().filter(|h| h.mode == m).count() as u64;
    let before = d.proc()?;
    let bench_before = proc_stats(std::process::id())?.cpu;
    let machine_before = Machine::read()?;
    eprintln!("{}: {clients} clients posting {plan}", d.name);
    let load = match sampler {
        None => generate(&d.events_url(), clients, plan, &b.body, 202, None),
        Some((every, sample)) => generate_sampled(&d.events_url(), clients, plan, &b.body, every, sample)?,
    };
    let acked = load.acked.len() as u64;
    let want = acked * hooks.len() as u64;
    eprintln!("{}: {acked} acknowledged; waiting for {want} deliveries", d.name);
    let complete = b.receiver.wait(want, b.args.stall);
    let after = d.proc()?;
    let bench_cpu = proc_stats(std::process::id())?.cpu.since(bench_before);
    let machine = Machine::read()?.since(machine_before);
    let tally = b.receiver.take();

    let acked_ids: HashSet<Uuid> = load.acked.iter().copied().collect();
    let delivered = tally.delivered.iter().filter(|(event, _)| acked_ids.contains(event)).count() as u64;
    let end_ns = tally.last_ns.max(load.end_ns);
    Ok(Run {
        posted: plan.count().unwrap_or(load.answered),
        clients,
        acked,
        failed: load.failed,
        acked_ns: load.end_ns - load.start_ns,
        max_lag_ms: load.max_lag_us as f64 / 1000.0,
        expected: acked * (per_event(Mode::Ok) + per_event(Mode::Flaky)),
        delivered,
        duplicates: tally.duplicates,
        unacked_delivered: tally.delivered.len() as u64 - delivered,
        unreadable: tally.unreadable,
        refused: tally.refused,
        hung: tally.hung,
        flaked: tally.flaked,
        delivered_ns: tally.last_ns.saturating_sub(load.start_ns),
        ack: Dist::of(load.latency_us),
        arrival: Dist::of(tally.latency_us),
        cpu: after.cpu.since(before.cpu),
        threads_cpu: after.threads_since(&before),
        bench_cpu,
        machine,
        wall_s: (end_ns - load.start_ns) as f64 / 1e9,
        proc: after,
        complete,
    })
}

/// Adds a run's figures to the report, keys prefixed with `p`.
fn report_run(r: &mut Report, p: &str, title: &str, run: &Run) {
    let k = |name: &str| format!("{p}{name}");
    // Names the run in warnings when a scenario has more than one.
    let who = if p.is_empty() { String::new() } else { format!("{}: ", p.trim_end_matches('_')) };
    r.say(format!("{title}:"));
    r.set(&k("events"), run.posted);
    r.set(&k("acked"), run.acked);
    r.set(&k("acked_per_s"), round(run.acked_per_s(), 1));
    r.set(&k("failed_posts"), run.failed.values().sum::<u64>());
    r.say(format!(
        "  acknowledged: {} of {} events in {:.2} s = {:.0}/s ({} clients){}",
        run.acked,
        run.posted,
        run.acked_ns as f64 / 1e9,
        run.acked_per_s(),
        run.clients,
        failures_note(&run.failed)
    ));
    if run.max_lag_ms > 0.0 {
        r.set(&k("max_lag_ms"), round(run.max_lag_ms, 3));
        r.say(format!("  pacing: sends started at most {:.1} ms behind schedule", run.max_lag_ms));
    }
    r.dist(&k("ack_"), "  202 latency", &run.ack);

    if run.expected > 0 {
        let missing = run.expected.saturating_sub(run.delivered);
        r.set(&k("delivered"), run.delivered);
        r.set(&k("delivered_per_s"), round(run.delivered_per_s(), 1));
        r.set(&k("missing"), missing);
        r.set(&k("duplicates"), run.duplicates);
        r.say(format!(
            "  delivered: {} of {} (event, webhook) pairs, {:.0}/s from first send to last arrival; {} missing, {} duplicates",
            run.delivered, run.expected, run.delivered_per_s(), missing, run.duplicates
        ));
        r.dist(p, "  ingest→arrival", &run.arrival);
        if missing > 0 {
            r.warn(format!("{who}{missing} deliveries of acknowledged events never arrived"));
        }
        if run.duplicates > 0 {
            r.warn(format!("{who}{} deliveries arrived more than once", run.duplicates));
        }
    }
    for (what, n) in [
        ("refused", run.refused),
        ("hung", run.hung),
        ("flaky_503", run.flaked),
        ("unacked_delivered", run.unacked_delivered),
        ("unreadable", run.unreadable),
    ] {
        if n > 0 {
            r.set(&k(what), n);
            r.say(format!("  {}: {n}", what.replace('_', " ")));
        }
    }
    if !run.complete {
        r.warn(format!(
            "{who}arrivals stalled for {} before all expected deliveries came",
            humantime::format_duration(r.stall)
        ));
    }
    let pct = |c: Cpu| 100.0 * c.total() / run.wall_s;
    r.set(&k("cpu_s"), round(run.cpu.total(), 2));
    r.set(&k("cpu_user_s"), round(run.cpu.user, 2));
    r.set(&k("cpu_sys_s"), round(run.cpu.sys, 2));
    r.set(&k("cpu_pct"), round(pct(run.cpu), 1));
    r.set(&k("bench_cpu_pct"), round(pct(run.bench_cpu), 1));
    r.set(&k("rss_mb"), round(mb(run.proc.rss_bytes), 1));
    r.set(&k("peak_rss_mb"), round(mb(run.proc.peak_rss_bytes), 1));
    r.say(format!(
        "  daemon: {:.2} s CPU ({:.2} user, {:.2} kernel) over {:.2} s = {:.0}% of one core; RSS {:.1} MB, peak {:.1} MB; {} threads",
        run.cpu.total(),
        run.cpu.user,
        run.cpu.sys,
        run.wall_s,
        pct(run.cpu),
        mb(run.proc.rss_bytes),
        mb(run.proc.peak_rss_bytes),
        run.proc.threads
    ));
    let busiest: Vec<(String, Cpu)> =
        run.threads_cpu.iter().filter(|(_, c)| c.total() >= 0.01).cloned().collect();
    r.set(
        &k("cpu_by_thread"),
        busiest
            .iter()
            .map(|(name, c)| (name.clone(), Value::from(round(c.total(), 2))))
            .collect::<serde_json::Map<_, _>>(),
    );
    let listed: Vec<String> = busiest
        .iter()
        .take(6)
        .map(|(name, c)| format!("{name} {:.2} s ({:.0}% kernel)", c.total(), 100.0 * c.sys / c.total()))
        .collect();
    r.say(format!("  daemon CPU by thread: {}", listed.join(", ")));
    r.say(format!("  load generator and receiver (this process): {:.0}% of one core", pct(run.bench_cpu)));
    // Whether there was idle time left to use: the daemon and this process
    // are not all (softirq work on loopback is charged to no thread).
    let m = run.machine;
    let busy_pct = 100.0 * m.busy as f64 / m.total.max(1) as f64;
    let switches = m.switches as f64 / run.acked.max(1) as f64;
    r.set(&k("machine_busy_pct"), round(busy_pct, 1));
    r.set(&k("switches_per_event"), round(switches, 1));
    r.say(format!(
        "  machine: {busy_pct:.0}% of all cores busy, {switches:.1} context switches per acknowledged event"
    ));
}

/// Stops the daemon and reports what is only known once it is down: how the
/// stop went, what it left on disk and what it logged.
fn finish(d: &mut Daemon, r: &mut Report, p: &str, events: u64) -> Result<()> {
    let stopped = d.stop()?;
    let disk = disk_usage(&d.storage())?;
    let k = |name: &str| format!("{p}{name}");
    r.set(&k("stop_ms"), round(ms(stopped.took), 1));
    r.set(&k("disk_bytes"), disk);
    r.set(&k("disk_bytes_per_event"), round(disk as f64 / events.max(1) as f64, 1));
    r.say(format!(
        "  stop: {} after {:.0} ms; storage {:.1} MB on disk = {:.0} bytes/event",
        stopped.status,
        ms(stopped.took),
        mb(disk),
        disk as f64 / events.max(1) as f64
    ));
    if !stopped.status.success() || stopped.killed {
        r.warn(format!(
            "{}: SIGTERM ended in {}{}; log: {}",
            d.name,
            stopped.status,
            if stopped.killed { " (killed after the stop limit)" } else { "" },
            d.log().display()
        ));
    }
    let log = std::fs::read_to_string(d.log()).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    r.set(&k("log_lines"), lines.len());
    if let Some(first) = lines.first() {
        r.warn(format!(
            "{}: {} warning/error lines in {}, first: {first}",
            d.name,
            lines.len(),
            d.log().display()
        ));
    }
    Ok(())
}

// ----------------------------------------------------------------- samples

/// How much a series may rise from its middle third to its last and still
/// count as flat: by up to `ratio` times, or by up to `slack` in its own unit.
#[derive(Clone, Copy)]
struct Flatness {
    ratio: f64,
    slack: f64,
}

/// For footprints: sled grows and reclaims its files in steps, so a steady
/// state still moves a little.
const FLAT_FOOTPRINT: Flatness = Flatness { ratio: 1.10, slack: 0.0 };
/// For per-interval latencies in ms: a p99 is a few hundred arrivals' tail,
/// and on loopback a scheduler hiccup moves a sub-millisecond p50 by half.
const FLAT_LATENCY: Flatness = Flatness { ratio: 1.5, slack: 5.0 };

/// What a sample sees of the load so far.
struct Progress<'a> {
    /// Since the clients started.
    elapsed: Duration,
    /// 202 answers counted so far, at every tick: (elapsed, count).
    ticks: &'a [(Duration, u64)],
    /// 202 latencies since the previous sample, microseconds.
    ack_us: Vec<u64>,
}

impl Progress<'_> {
    fn acked(&self) -> u64 {
        self.ticks.last().map_or(0, |&(_, n)| n)
    }

    /// Acknowledged within the last `window`, to the nearest tick.
    fn acked_within(&self, window: Duration) -> u64 {
        let since = self.elapsed.saturating_sub(window);
        let i = self.ticks.partition_point(|&(t, _)| t <= since);
        self.acked() - i.checked_sub(1).map_or(0, |i| self.ticks[i].1)
    }
}

/// One row of a soak or churn series.
struct Sample {
    elapsed_s: f64,
    rss: u64,
    fds: u64,
    disk: u64,
    acked: u64,
    /// Acknowledged within the last retention period: roughly the events
    /// retention may not delete yet.
    live: u64,
    /// Distinct (event, webhook) pairs answered 200 so far.
    delivered: u64,
    /// Ingest→arrival of the deliveries first answered 200 in this interval.
    arrival: Dist,
    /// 202 latency of the answers in this interval.
    ack: Dist,
}

impl Sample {
    const HEADER: &'static str = "    t_s  rss_mb   fds  disk_mb     acked     live  B/live  delivered  arrivals  arr_p50_ms  arr_p99_ms  ack_p99_ms";

    fn disk_per_live(&self) -> f64 {
        self.disk as f64 / self.live.max(1) as f64
    }

    fn row(&self) -> String {
        format!(
            "{:>7.0} {:>7.1} {:>5} {:>8.1} {:>9} {:>8} {:>7.0} {:>10} {:>9} {:>11.2} {:>11.2} {:>11.2}",
            self.elapsed_s,
            mb(self.rss),
            self.fds,
            mb(self.disk),
            self.acked,
            self.live,
            self.disk_per_live(),
            self.delivered,
            self.arrival.n,
            self.arrival.p50,
            self.arrival.p99,
            self.ack.p99
        )
    }

    fn json(&self) -> Value {
        serde_json::json!({
            "t_s": round(self.elapsed_s, 1),
            "rss_mb": round(mb(self.rss), 1),
            "fds": self.fds,
            "disk_bytes": self.disk,
            "acked": self.acked,
            "live": self.live,
            "disk_bytes_per_live": round(self.disk_per_live(), 1),
            "delivered": self.delivered,
            "arrivals": self.arrival.n,
            "arrival_p50_ms": round(self.arrival.p50, 3),
            "arrival_p99_ms": round(self.arrival.p99, 3),
            "ack_p99_ms": round(self.ack.p99, 3),
        })
    }
}

/// The samples of one run, each printed as it is taken.
struct Series {
    retention: Duration,
    samples: Vec<Sample>,
    /// Arrival latencies already in an earlier sample.
    seen: usize,
}

impl Series {
    fn new(retention: Duration) -> Series {
        Series { retention, samples: Vec::new(), seen: 0 }
    }

    fn take(&mut self, b: &Bench, d: &Daemon, p: Progress) -> Result<()> {
        let proc = d.proc()?;
        let disk = disk_usage(&d.storage())?;
        let (delivered, arrival_us) = b.receiver.delivered_since(self.seen);
        self.seen += arrival_us.len();
        let sample = Sample {
            elapsed_s: p.elapsed.as_secs_f64(),
            rss: proc.rss_bytes,
            fds: proc.fds,
            disk,
            acked: p.acked(),
            live: p.acked_within(self.retention),
            delivered,
            arrival: Dist::of(arrival_us),
            ack: Dist::of(p.ack_us),
        };
        if self.samples.is_empty() {
            eprintln!("{}", Sample::HEADER);
        }
        eprintln!("{}", sample.row());
        self.samples.push(sample);
        Ok(())
    }
}

/// The middle and the last third of a series, or `None` below nine items:
/// a third of one or two samples is one interval's noise, not a trend. The
/// first third is left out on purpose: it holds the warm-up (sled's cache
/// filling, the retention period not yet over), so measured against it every
/// healthy run would look like it grows.
fn thirds<T>(xs: &[T]) -> Option<(&[T], &[T])> {
    let (n, t) = (xs.len(), xs.len() / 3);
    (t >= 3).then(|| (&xs[n - 2 * t..n - t], &xs[n - t..]))
}

/// Prints and records the config values a scenario chose.
fn report_settings(r: &mut Report, s: &Settings, workers: usize) {
    let retention = s.retention.map_or("default".into(), |d| humantime::format_duration(d).to_string());
    r.say(format!(
        "config: [storage] retention = {retention}; [delivery] timeout = {}, retry_schedule = [{}], workers = {workers}; everything else the daemon's defaults",
        s.timeout,
        s.retry_schedule.join(", ")
    ));
    r.set("retention_s", s.retention.map(|d| d.as_secs_f64()));
    r.set("timeout", s.timeout);
    r.set("retry_schedule", s.retry_schedule.to_vec());
}

/// Adds the samples to the summary as a table and to the JSON as `samples`.
fn report_series(r: &mut Report, samples: &[Sample], every: Duration) {
    r.set("sample_s", every.as_secs());
    r.set("samples", samples.iter().map(Sample::json).collect::<Vec<_>>());
    r.say(format!(
        "samples every {} (latencies of that interval alone; B/live = disk bytes per live event):",
        humantime::format_duration(every)
    ));
    r.say(Sample::HEADER);
    for s in samples {
        r.say(s.row());
    }
}

/// Reports how one figure moved over a series: first, last, min, max and the
/// ratio of its last third's median to its middle third's. Returns whether
/// the rise stays within `limit`, or `None` when there is nothing to judge
/// (too few samples, or `premature`: the figure cannot have settled yet).
fn report_trend(
    r: &mut Report,
    key: &str,
    label: &str,
    xs: &[f64],
    limit: Flatness,
    premature: bool,
) -> Option<bool> {
    let (&first, &last) = (xs.first()?, xs.last()?);
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Medians, not averages: an arrival p99 sits between two retry delays and
    // now and then flips to the longer one for an interval, while a leak
    // moves the median as surely as the average.
    let median = |s: &[f64]| {
        let mut s = s.to_vec();
        s.sort_by(f64::total_cmp);
        (s[(s.len() - 1) / 2] + s[s.len() / 2]) / 2.0
    };
    let medians = thirds(xs).map(|(middle, end)| (median(middle), median(end)));
    // Both thirds at zero (no arrivals, say) is flat, not 0/0.
    let ratio = medians.map(|(m, e)| if m == e { 1.0 } else { e / m });
    let flat = medians.filter(|_| !premature).map(|(m, e)| e <= m * limit.ratio || e - m <= limit.slack);
    r.set(
        key,
        serde_json::json!({
            "first": round(first, 3), "last": round(last, 3), "min": round(min, 3), "max": round(max, 3),
            "ratio": ratio.map(|x| round(x, 3)), "flat": flat,
        }),
    );
    let verdict = match (ratio, flat) {
        (None, _) => "too few samples to judge".to_owned(),
        (Some(x), None) => format!("last/middle third {x:.2}, too early to judge"),
        (Some(x), Some(flat)) => {
            format!("last/middle third {x:.2}: {}", if flat { "flat" } else { "growing" })
        }
    };
    r.say(format!("  {label}: first {first:.1}, last {last:.1}, min {min:.1}, max {max:.1}; {verdict}"));
    flat
}

// ------------------------------------------------------------------- setup

/// What every scenario shares: the daemon binary, the temp directory, the
/// receiver and the event body.
struct Bench<'a> {
    args: &'a Args,
    bin: PathBuf,
    work: WorkDir,
    receiver: Receiver,
    body: Body,
    client_id: Uuid,
}

impl<'a> Bench<'a> {
    fn new(args: &'a Args) -> Result<Bench<'a>> {
        let bin = match &args.daemon {
            Some(path) => path.clone(),
            None => {
                std::env::current_exe().context("locating this executable")?.with_file_name("nexor-webhookd")
            }
        };
        if !bin.is_file() {
            bail!(
                "daemon binary {} not found: run `cargo build --release` first (or pass --daemon PATH)",
                bin.display()
            );
        }
        let client_id = Uuid::new_v4();
        Ok(Bench {
            args,
            bin,
            work: WorkDir::create()?,
            receiver: Receiver::start()?,
            body: Body::new(client_id),
            client_id,
        })
    }

    fn clients(&self, default: usize) -> usize {
        self.args.clients.unwrap_or(default).max(1)
    }

    fn paced(&self, rate: u64, seconds: u64) -> Plan {
        let rate = self.args.rate.unwrap_or(rate).max(1);
        let n = rate * self.args.seconds.unwrap_or(seconds);
        Plan::Paced { rate, n }
    }

    fn sample_every(&self, default: u64) -> Duration {
        Duration::from_secs(self.args.sample.unwrap_or(default).max(1))
    }

    /// Webhooks of this bench's client, `count` of each receiver behaviour,
    /// each on its own path.
    fn hooks(&self, modes: &[(Mode, usize)]) -> Vec<Hook> {
        modes
            .iter()
            .flat_map(|&(mode, count)| {
                (0..count).map(move |i| Hook {
                    id: Uuid::new_v4(),
                    mode,
                    url: self.receiver.url(&format!("/{}/{i}", mode.segment())),
                })
            })
            .collect()
    }

    /// Writes a config into a fresh subdirectory and starts a daemon on it.
    fn daemon(&self, name: &str, hooks: &[Hook], settings: &Settings) -> Result<Daemon> {
        let dir = self.work.path.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // A JSON string is a valid TOML basic string.
        let quote = |s: &str| Value::from(s).to_string();
        let retention = settings.retention.map_or(String::new(), |d| {
            format!("retention = {}\n", quote(&humantime::format_duration(d).to_string()))
        });
        let mut config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[storage]\npath = \"data\"\n{retention}\n\
             [delivery]\ntimeout = {}\nretry_schedule = [{}]\nallow_private_targets = true\nworkers = {}\n",
            quote(settings.timeout),
            settings.retry_schedule.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "),
            self.args.workers,
        );
        if let Some(n) = self.args.per_webhook {
            config.push_str(&format!("per_webhook_in_flight = {n}\n"));
        }
        for h in hooks {
            config.push_str(&format!(
                "\n[[webhooks]]\nid = \"{}\"\nclient_id = \"{}\"\nurl = {}\nsecret = \"whsec_loadtest_{}\"\nevents = [\"*\"]\n",
                h.id,
                self.client_id,
                quote(&h.url),
                h.id.simple()
            ));
        }
        // Owner-only, as the daemon expects of a file holding secrets.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("config.toml"))
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .context("writing the config")?;
        let mut d = Daemon {
            name: name.to_owned(),
            bin: self.bin.clone(),
            base: format!("http://127.0.0.1:{port}"),
            dir,
            process: None,
        };
        let took = d.launch()?;
        eprintln!("{name}: daemon healthy after {:.0} ms", ms(took));
        Ok(d)
    }
}

/// The config values a scenario chooses; everything else is the daemon's default.
#[derive(Clone, Copy)]
struct Settings {
    /// `[delivery] timeout`
    timeout: &'static str,
    /// `[delivery] retry_schedule`
    retry_schedule: &'static [&'static str],
    /// `[storage] retention`; `None` leaves the daemon's default.
    retention: Option<Duration>,
}

struct Hook {
    id: Uuid,
    mode: Mode,
    url: String,
}

/// A directory of our own under the system temp dir, removed on drop unless
/// kept (for `--keep`, and after a failure so the logs can be read).
struct WorkDir {
    path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl WorkDir {
    fn create() -> Result<WorkDir> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let path = std::env::temp_dir().join(format!("nexor-loadtest-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path, keep: false.into() })
    }

    fn keep(&self) {
        self.keep.set(true);
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep.get() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ------------------------------------------------------------------ daemon

/// The daemon as a child process, on its own config directory.
struct Daemon {
    name: String,
    bin: PathBuf,
    dir: PathBuf,
    base: String,
    process: Option<Process>,
}

impl Daemon {
    fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn storage(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn events_url(&self) -> String {
        format!("{}/v1/events", self.base)
    }

    /// Spawns the process and waits for `/healthz`; returns how long that took.
    fn launch(&mut self) -> Result<Duration> {
        let mut command = Command::new(&self.bin);
        command
            .arg("run")
            .arg("--config")
            .arg(self.config())
            // The daemon logs each attempt at info level; at these rates
            // that would measure logging, and bury warnings in the log.
            .env("RUST_LOG", "warn");
        let health = format!("{}/healthz", self.base);
        let (process, took) =
            Process::start(command, &self.log(), &health, START_LIMIT).with_context(|| {
                format!("{}: {}; log: {}", self.name, self.bin.display(), self.log().display())
            })?;
        self.process = Some(process);
        Ok(took)
    }

    fn proc(&self) -> Result<ProcStats> {
        let pid = self.process.as_ref().and_then(Process::pid).context("daemon not running")?;
        proc_stats(pid)
    }

    /// SIGTERM, then wait; killed if it outlasts [`STOP_LIMIT`].
    fn stop(&mut self) -> Result<Stopped> {
        Ok(self.process.take().context("daemon not running")?.stop(STOP_LIMIT)?)
    }
}

struct ProcStats {
    cpu: Cpu,
    /// CPU time per group of like-named threads (`deliver-*`, `tokio-rt-worker`, …).
    threads_cpu: BTreeMap<String, Cpu>,
    rss_bytes: u64,
    peak_rss_bytes: u64,
    threads: u64,
    /// Open file descriptors.
    fds: u64,
}

/// CPU seconds spent in user space and in the kernel.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(self) -> f64 {
        self.user + self.sys
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu { user: self.user - before.user, sys: self.sys - before.sys }
    }
}

impl ProcStats {
    /// The CPU each thread group used since `before`, busiest first.
    fn threads_since(&self, before: &ProcStats) -> Vec<(String, Cpu)> {
        let mut used: Vec<(String, Cpu)> = self
            .threads_cpu
            .iter()
            .map(|(name, cpu)| {
                let was = before.threads_cpu.get(name).copied().unwrap_or_default();
                (name.clone(), cpu.since(was))
            })
            .collect();
        used.sort_by(|a, b| b.1.total().total_cmp(&a.1.total()));
        used
    }
}

fn proc_stats(pid: u32) -> Result<ProcStats> {
    let (_, cpu) = stat_cpu(&format!("/proc/{pid}/stat"))?;
    let mut threads_cpu = BTreeMap::<String, Cpu>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended between listing and reading has nothing to add.
        let Ok((name, c)) = stat_cpu(&format!("{}/stat", task?.path().display())) else {
            continue;
        };
        let group = name.trim_end_matches(|ch: char| ch.is_ascii_digit() || ch == '-');
        let sum = threads_cpu.entry(group.to_owned()).or_default();
        (sum.user, sum.sys) = (sum.user + c.user, sum.sys + c.sys);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStats {
        cpu,
        threads_cpu,
        rss_bytes: field("VmRSS:") * 1024,
        peak_rss_bytes: field("VmHWM:") * 1024,
        threads: field("Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
    })
}

/// The command name and CPU time from a `/proc/…/stat` file.
fn stat_cpu(path: &str) -> Result<(String, Cpu)> {
    let stat = std::fs::read_to_string(path)?;
    // The name may hold spaces and parentheses, so it is cut at the last ')';
    // fields are counted after it, where field 3 (state) is index 0.
    let (head, rest) = stat.rsplit_once(')').context("malformed /proc stat")?;
    let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let secs = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()? as f64 / hz)
    };
    Ok((name, Cpu { user: secs(11)?, sys: secs(12)? }))
}

/// Whole-machine counters from `/proc/stat`: CPU ticks (all cores) busy and
/// in all, and context switches.
#[derive(Clone, Copy, Default)]
struct Machine {
    busy: u64,
    total: u64,
    switches: u64,
}

impl Machine {
    fn read() -> Result<Machine> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let mut m = Machine::default();
        for line in stat.lines() {
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("cpu") => {
                    // user nice system idle iowait irq softirq steal
                    let t: Vec<u64> = fields.take(8).map(str::parse).collect::<Result<_, _>>()?;
                    let idle = t.get(3).zip(t.get(4)).context("short cpu line in /proc/stat")?;
                    m.total = t.iter().sum();
                    m.busy = m.total - idle.0 - idle.1;
                }
                Some("ctxt") => m.switches = fields.next().context("short ctxt line")?.parse()?,
                _ => {}
            }
        }
        Ok(m)
    }

    fn since(self, before: Machine) -> Machine {
        Machine {
            busy: self.busy - before.busy,
            total: self.total - before.total,
            switches: self.switches - before.switches,
        }
    }
}

/// Bytes allocated on disk under `dir` (not apparent sizes: sled's files can
/// be sparse or preallocated).
fn disk_usage(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        // Measured while the daemon runs too, when sled may remove a file
        // (an old snapshot, say) between listing and reading it.
        let meta = match entry.metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            meta => meta?,
        };
        total += if meta.is_dir() { disk_usage(&entry.path())? } else { meta.blocks() * 512 };
    }
    Ok(total)
}

// ---------------------------------------------------------------- receiver

/// How the receiver answers, by a path's first segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `/ok/…`: 200 at once; the delivery is checked and timed.
    Ok,
    /// `/down/…`: 503 at once until [`Receiver::bring_up`], then as `/ok/`.
    Down,
    /// `/hang/…`: no answer within any delivery timeout.
    Hang,
    /// `/raw`: 200 without reading the body; the ceiling measurement.
    Raw,
    /// `/flaky/…`: as `/ok/`, but 503 to a random share of attempts (see [`Flaky`]).
    Flaky,
}

impl Mode {
    fn segment(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Down => "down",
            Mode::Hang => "hang",
            Mode::Raw => "raw",
            Mode::Flaky => "flaky",
        }
    }
}

/// What the receiver has seen since the last [`Receiver::take`].
#[derive(Default)]
struct Tally {
    /// (event_id, webhook_id) of every `/ok/` delivery.
    delivered: HashSet<(Uuid, Uuid)>,
    duplicates: u64,
    /// Ingest→arrival of every `/ok/` delivery, microseconds.
    latency_us: Vec<u64>,
    refused: u64,
    hung: u64,
    raw: u64,
    /// Requests on unknown paths or `/ok/` bodies that are not our envelope.
    unreadable: u64,
    /// When the last delivery answered 200 or 503 arrived.
    last_ns: u64,
    /// `/flaky/` attempts answered 503 on purpose. Each is retried, so none
    /// ends a delivery, and they are not arrivals.
    flaked: u64,
    /// How often each `/flaky/` delivery not yet answered 200 was refused.
    refusals: HashMap<(Uuid, Uuid), usize>,
    /// State of the generator that picks the `/flaky/` attempts to refuse.
    rng: u64,
}

impl Tally {
    fn arrivals(&self) -> u64 {
        self.delivered.len() as u64 + self.duplicates + self.refused + self.hung + self.raw + self.unreadable
    }

    /// Counts one request and says how to answer it.
    fn record(&mut self, mode: Option<Mode>, body: &[u8], flaky: Flaky) -> StatusCode {
        let at = now_ns();
        match mode {
            Some(m @ (Mode::Ok | Mode::Flaky)) => match serde_json::from_slice::<Envelope>(body) {
                Ok(e) if m == Mode::Flaky && self.refuse((e.event_id, e.webhook_id), flaky) => {
                    self.flaked += 1;
                    StatusCode::SERVICE_UNAVAILABLE
                }
                Ok(e) => {
                    if self.delivered.insert((e.event_id, e.webhook_id)) {
                        self.latency_us.push(at.saturating_sub(e.data.sent_ns) / 1000);
                    } else {
                        self.duplicates += 1;
                    }
                    self.last_ns = at;
                    StatusCode::OK
                }
                Err(_) => {
                    self.unreadable += 1;
                    StatusCode::BAD_REQUEST
                }
            },
            Some(Mode::Down) => {
                self.refused += 1;
                self.last_ns = at;
                StatusCode::SERVICE_UNAVAILABLE
            }
            Some(Mode::Hang) => {
                self.hung += 1;
                StatusCode::OK
            }
            Some(Mode::Raw) => {
                self.raw += 1;
                StatusCode::OK
            }
            None => {
                self.unreadable += 1;
                StatusCode::NOT_FOUND
            }
        }
    }

    /// Whether to answer this attempt of a `/flaky/` delivery 503: at random
    /// with the set probability, but never more often per delivery than
    /// [`Flaky::cap`], so that its last attempt gets through.
    fn refuse(&mut self, delivery: (Uuid, Uuid), flaky: Flaky) -> bool {
        // splitmix64: uniform enough for this, and no dependency for it.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let roll = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        let refused = self.refusals.get(&delivery).copied().unwrap_or(0);
        if roll < flaky.rate && refused < flaky.cap {
            self.refusals.insert(delivery, refused + 1);
            true
        } else {
            self.refusals.remove(&delivery);
            false
        }
    }
}

/// How `/flaky/` paths answer; set once by the scenario that uses them.
#[derive(Clone, Copy, Default)]
struct Flaky {
    /// Share of attempts answered 503.
    rate: f64,
    /// At most this many 503s per delivery: its number of retries.
    cap: usize,
}

/// The receiver, on a runtime with one thread of its own: it never waits
/// for the load generator's thread, and a second thread only added CPU
/// (36–37% of a core for load generator and receiver at full speed, against
/// 35% with one).
struct Receiver {
    server: Server,
    shared: Arc<Shared>,
}

/// The receiver's state, shared with its handler.
#[derive(Default)]
struct Shared {
    tally: Mutex<Tally>,
    /// Whether `/down/` paths are back up.
    up: AtomicBool,
    flaky: OnceLock<Flaky>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new().fallback(receive).with_state(shared.clone());
        // Held `/hang/` requests do not keep its drop waiting: the server
        // stops its runtime in the background.
        Ok(Receiver { server: Server::start(app, 1)?, shared })
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    /// Returns what was seen so far and starts counting afresh.
    fn take(&self) -> Tally {
        std::mem::take(&mut *self.shared.tally.lock().unwrap())
    }

    /// From now on `/down/` paths answer as `/ok/` ones do.
    fn bring_up(&self) {
        self.shared.up.store(true, Ordering::Relaxed);
    }

    /// Sets how `/flaky/` paths fail: `rate` of attempts, at most `cap` per delivery.
    fn make_flaky(&self, rate: f64, cap: usize) {
        // Set once, before any delivery, so a second call is a bug here.
        assert!(self.shared.flaky.set(Flaky { rate, cap }).is_ok(), "flaky receiver set twice");
    }

    /// Distinct deliveries answered 200 so far, and the ingest→arrival
    /// latencies recorded after the first `from` of them.
    fn delivered_since(&self, from: usize) -> (u64, Vec<u64>) {
        let tally = self.shared.tally.lock().unwrap();
        (tally.delivered.len() as u64, tally.latency_us.get(from..).unwrap_or_default().to_vec())
    }

    /// Waits until `want` arrivals have been seen, or until none has come for
    /// `stall`; says which.
    fn wait(&self, want: u64, stall: Duration) -> bool {
        let (mut last, mut since, mut said) = (u64::MAX, Instant::now(), Instant::now());
        loop {
            let n = self.shared.tally.lock().unwrap().arrivals();
            if n >= want {
                return true;
            }
            if n != last {
                (last, since) = (n, Instant::now());
            }
            if since.elapsed() >= stall {
                return false;
            }
            if said.elapsed() >= Duration::from_secs(5) {
                eprintln!("  {n} of {want} deliveries arrived");
                said = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    event_id: Uuid,
    webhook_id: Uuid,
    data: SentAt,
}

#[derive(Deserialize)]
struct SentAt {
    sent_ns: u64,
}

async fn receive(State(shared): State<Arc<Shared>>, uri: Uri, body: Bytes) -> StatusCode {
    let segment = uri.path().trim_start_matches('/').split('/').next();
    let mode = [Mode::Ok, Mode::Down, Mode::Hang, Mode::Raw, Mode::Flaky]
        .into_iter()
        .find(|m| Some(m.segment()) == segment);
    let mode = match mode {
        Some(Mode::Down) if shared.up.load(Ordering::Relaxed) => Some(Mode::Ok),
        m => m,
    };
    let flaky = shared.flaky.get().copied().unwrap_or_default();
    let status = shared.tally.lock().unwrap().record(mode, &body, flaky);
    if mode == Some(Mode::Hang) {
        tokio::time::sleep(HANG_HOLD).await;
    }
    status
}

// ---------------------------------------------------------- load generator

#[derive(Clone, Copy)]
enum Plan {
    /// This many requests, as fast as the clients go.
    Count(u64),
    /// `n` requests, request `i` due `i / rate` seconds after the start: a
    /// schedule, so a slow answer does not push every later send back.
    Paced { rate: u64, n: u64 },
    /// As many requests as the clients manage in this time.
    For(Duration),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Count(n) => write!(f, "{n} events as fast as possible"),
            Plan::Paced { rate, n } => write!(f, "{n} events at {rate}/s"),
            Plan::For(d) => write!(f, "for {}", humantime::format_duration(*d)),
        }
    }
}

impl Plan {
    fn count(self) -> Option<u64> {
        match self {
            Plan::Count(n) | Plan::Paced { n, .. } => Some(n),
            Plan::For(_) => None,
        }
    }
}

/// The ingest request, with the send time spliced in at the last moment.
struct Body {
    head: String,
    tail: String,
}

impl Body {
    fn new(client_id: Uuid) -> Body {
        let head =
            format!(r#"{{"event_type":"meeting.scheduled","client_id":"{client_id}","data":{{"sent_ns":"#);
        // Sized with a 13-digit time in mind; the exact figure hardly matters.
        let pad = DATA_BYTES.saturating_sub(r#"{"sent_ns":1234567890123,"pad":""}"#.len());
        let tail = format!(r#","pad":"{}"}}}}"#, "x".repeat(pad));
        Body { head, tail }
    }

    fn render(&self, sent_ns: u64) -> String {
        format!("{}{sent_ns}{}", self.head, self.tail)
    }
}

/// What the clients saw.
#[derive(Default)]
struct Load {
    /// Event ids from the 202 answers.
    acked: Vec<Uuid>,
    /// Requests answered with the expected status.
    answered: u64,
    /// Other statuses and transport errors, by kind.
    failed: BTreeMap<String, u64>,
    /// Of the answered requests, microseconds.
    latency_us: Vec<u64>,
    start_ns: u64,
    /// When the last expected answer came.
    end_ns: u64,
    max_lag_us: u64,
}

impl Load {
    fn merge(&mut self, other: Load) {
        self.acked.extend(other.acked);
        self.answered += other.answered;
        for (k, n) in other.failed {
            *self.failed.entry(k).or_default() += n;
        }
        self.latency_us.extend(other.latency_us);
        self.end_ns = self.end_ns.max(other.end_ns);
        self.max_lag_us = self.max_lag_us.max(other.max_lag_us);
    }
}

#[derive(Deserialize)]
struct Ack {
    event_id: Uuid,
}

/// What the clients share with a sampler while the load runs. Only sampled
/// loads have one, so the others measure without its shared counter and lock.
#[derive(Default)]
struct Live {
    acked: AtomicU64,
    /// 202 latencies since the sampler last took them, microseconds.
    ack_us: Mutex<Vec<u64>>,
    /// Set when sampling failed: the clients stop early.
    stop: AtomicBool,
}

/// How often a sampled load records its acknowledged count, and checks
/// whether it has ended.
const TICK: Duration = Duration::from_millis(100);

/// Runs `plan` against `url` from `clients` connections and merges what they saw.
///
/// The clients are futures on one current-thread runtime, each with its own
/// keep-alive HTTP/1.1 connection (hyper), so one thread waits for all of
/// them in epoll. A blocking thread per client cost ~34 µs of CPU per event
/// at full speed (15% of all samples under perf), taken from the daemon
/// under test on these 2 cores.
fn generate(url: &str, clients: usize, plan: Plan, body: &Body, expect: u16, live: Option<&Live>) -> Load {
    let target = Target::parse(url).expect("the load clients' URL is made here");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the load clients");
    let next = AtomicU64::new(0);
    let start_ns = now_ns();
    let clients = (0..clients).map(|_| client(&target, plan, body, expect, start_ns, &next, live));
    let parts = runtime.block_on(futures_util::future::join_all(clients));
    let mut load = Load { start_ns, end_ns: start_ns, ..Load::default() };
    parts.into_iter().for_each(|p| load.merge(p));
    load
}

/// [`generate`] of 202-answered ingest requests while this thread calls
/// `sample` every `every`, and once more as the load ends unless the last
/// sample was under half an interval before: the end state is always in the
/// series, and never twice.
fn generate_sampled(
    url: &str,
    clients: usize,
    plan: Plan,
    body: &Body,
    every: Duration,
    sample: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Load> {
    let live = Live::default();
    std::thread::scope(|s| {
        let load = s.spawn(|| generate(url, clients, plan, body, 202, Some(&live)));
        let start = Instant::now();
        let (mut ticks, mut due, mut taken) = (Vec::new(), every, Duration::ZERO);
        let mut failed = Ok(());
        loop {
            let ended = load.is_finished();
            let elapsed = start.elapsed();
            ticks.push((elapsed, live.acked.load(Ordering::Relaxed)));
            if elapsed >= due || (ended && elapsed - taken >= every / 2) {
                let ack_us = std::mem::take(&mut *live.ack_us.lock().unwrap());
                failed = sample(Progress { elapsed, ticks: &ticks, ack_us });
                taken = elapsed;
                while due <= elapsed {
                    due += every;
                }
            }
            if ended || failed.is_err() {
                break;
            }
            std::thread::sleep(TICK);
        }
        live.stop.store(true, Ordering::Relaxed);
        let load = load.join().expect("load thread panicked");
        failed.map(|()| load)
    })
}

async fn client(
    target: &Target,
    plan: Plan,
    body: &Body,
    expect: u16,
    start_ns: u64,
    next: &AtomicU64,
    live: Option<&Live>,
) -> Load {
    let mut conn = None;
    let mut seen = Load::default();
    loop {
        if live.is_some_and(|l| l.stop.load(Ordering::Relaxed)) {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        match plan {
            Plan::Count(n) | Plan::Paced { n, .. } if i >= n => break,
            Plan::For(d) if now_ns() - start_ns >= d.as_nanos() as u64 => break,
            Plan::Paced { rate, .. } => {
                let due = start_ns + (i as u128 * 1_000_000_000 / rate as u128) as u64;
                let now = now_ns();
                if due > now {
                    tokio::time::sleep(Duration::from_nanos(due - now)).await;
                }
                seen.max_lag_us = seen.max_lag_us.max(now_ns().saturating_sub(due) / 1000);
            }
            _ => {}
        }
        let sent = now_ns();
        let answer = tokio::time::timeout(CLIENT_TIMEOUT, target.post(&mut conn, body.render(sent))).await;
        let kind = match answer {
            Ok(Ok((status, answer))) if status == expect => {
                let done = now_ns();
                let took_us = (done - sent) / 1000;
                seen.answered += 1;
                seen.latency_us.push(took_us);
                if let Some(live) = live {
                    live.acked.fetch_add(1, Ordering::Relaxed);
                    live.ack_us.lock().unwrap().push(took_us);
                }
                seen.end_ns = done;
                if let Ok(ack) = serde_json::from_slice::<Ack>(&answer) {
                    seen.acked.push(ack.event_id);
                }
                continue;
            }
            Ok(Ok((status, _))) => format!("HTTP {status}"),
            // A failed or unfinished exchange may leave the connection
            // unusable: the next request starts afresh.
            Ok(Err(e)) => {
                conn = None;
                e
            }
            Err(_) => {
                conn = None;
                format!("no answer within {}", humantime::format_duration(CLIENT_TIMEOUT))
            }
        };
        *seen.failed.entry(kind).or_default() += 1;
    }
    seen
}

/// Where the load clients post, and how: HTTP/1.1 with keep-alive.
struct Target {
    /// `host:port`, to connect to and to name in `Host`.
    authority: String,
    path: String,
}

/// One client's open connection.
type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

impl Target {
    fn parse(url: &str) -> Result<Target> {
        let url = url::Url::parse(url)?;
        let host = url.host_str().context("no host in the URL")?;
        let port = url.port_or_known_default().context("no port in the URL")?;
        Ok(Target { authority: format!("{host}:{port}"), path: url.path().to_string() })
    }

    /// POSTs `body` as JSON on `conn`, connecting first if there is none;
    /// the status and body of the answer.
    async fn post(&self, conn: &mut Option<Conn>, body: String) -> Result<(u16, Bytes), String> {
        let sender = match conn {
            Some(sender) => sender,
            None => conn.insert(self.connect().await.map_err(|e| format!("connect: {e}"))?),
        };
        let request = axum::http::Request::post(&self.path)
            .header(axum::http::header::HOST, &self.authority)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let answer = response.into_body().collect().await.map_err(|e| e.to_string())?;
        Ok((status, answer.to_bytes()))
    }

    async fn connect(&self) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(&self.authority).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        // Drives the connection's I/O; ends when `sender` is dropped.
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// POSTs an empty body and returns the JSON answer; anything but 2xx is an error.
fn post_json(url: &str) -> Result<Value> {
    // A control call that may work through the whole store before answering.
    let text =
        text_of(&format!("POST {url}"), client_agent(Duration::from_secs(600)).post(url).send_empty())?;
    Ok(serde_json::from_str(&text)?)
}

/// GETs `url` and returns the body; anything but 2xx is an error.
fn get_text(url: &str) -> Result<String> {
    text_of(&format!("GET {url}"), client_agent(Duration::from_secs(600)).get(url).call())
}

/// The body of a 2xx answer; anything else is an error naming `what`.
fn text_of(what: &str, answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<String> {
    let mut resp = answer?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    if !(200..300).contains(&status) {
        bail!("{what}: HTTP {status}: {text}");
    }
    Ok(text)
}

/// Now, as RFC 3339 UTC.
fn rfc3339_now() -> Result<String> {
    Ok(time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?)
}

/// A keep-alive agent with per-phase timeouts: ureq 3.5 resolves on a fresh
/// thread per request when a global timeout is set, which would measure
/// thread creation rather than the daemon.
fn client_agent(timeout: Duration) -> ureq::Agent {
    let t = Some(timeout);
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_connect(t)
        .timeout_send_request(t)
        .timeout_send_body(t)
        .timeout_recv_response(t)
        .timeout_recv_body(t)
        .build()
        .new_agent()
}

// ----------------------------------------------------------------- figures

/// Nanoseconds since a process-wide epoch: the one clock both the load
/// generator and the receiver read, so their difference is a latency.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A latency distribution in milliseconds.
#[derive(Clone, Copy, Default)]
struct Dist {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Dist {
    fn of(mut us: Vec<u64>) -> Dist {
        if us.is_empty() {
            return Dist::default();
        }
        us.sort_unstable();
        // Nearest rank: the smallest sample with at least p of all at or below it.
        let at = |p: f64| {
            let rank = (p * us.len() as f64).ceil() as usize;
            us[rank.clamp(1, us.len()) - 1] as f64 / 1000.0
        };
        Dist { n: us.len(), p50: at(0.50), p99: at(0.99), max: at(1.0) }
    }
}

fn per_s(count: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        count as f64 * 1e9 / ns as f64
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn failures_note(failed: &BTreeMap<String, u64>) -> String {
    if failed.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failed.iter().map(|(k, n)| format!("{n}× {k}")).collect();
    format!("; failed: {}", list.join(", "))
}

/// The human summary and the JSON figures, filled in side by side.
struct Report {
    fields: Vec<(String, Value)>,
    lines: Vec<String>,
    warnings: Vec<String>,
    stall: Duration,
}

impl Report {
    fn new(args: &Args, bench: &Bench) -> Report {
        let scenario = scenario_name(args.scenario);
        let commit = git(&bench.bin, &["rev-parse", "--short", "HEAD"]);
        let dirty =
            git(&bench.bin, &["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut r = Report { fields: Vec::new(), lines: Vec::new(), warnings: Vec::new(), stall: args.stall };
        r.set("scenario", scenario.clone());
        r.set("commit", commit.clone());
        r.set("dirty", dirty);
        r.set("cores", cores);
        r.set("workers", args.workers);
        r.say(format!(
            "nexor-webhookd loadtest: {scenario} (commit {}{}, {cores} cores, {} delivery workers)",
            commit.as_deref().unwrap_or("unknown"),
            if dirty == Some(true) { "+changes" } else { "" },
            args.workers
        ));
        if cfg!(debug_assertions) {
            r.warn("loadtest is a debug build; build with --release for figures that mean anything");
        }
        r
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.push((key.to_owned(), value.into()));
    }

    fn say(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    fn warn(&mut self, w: impl Into<String>) {
        self.warnings.push(w.into());
    }

    /// Reports a distribution as `{prefix}p50_ms` and so on.
    fn dist(&mut self, prefix: &str, label: &str, d: &Dist) {
        self.set(&format!("{prefix}p50_ms"), round(d.p50, 3));
        self.set(&format!("{prefix}p99_ms"), round(d.p99, 3));
        self.set(&format!("{prefix}max_ms"), round(d.max, 3));
        self.say(format!(
            "{label}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            d.p50, d.p99, d.max, d.n
        ));
    }

    fn print(mut self) {
        for line in &self.lines {
            println!("{line}");
        }
        for w in &self.warnings {
            println!("WARNING: {w}");
        }
        let warnings = std::mem::take(&mut self.warnings);
        self.set("warnings", warnings);
        let fields: Vec<String> =
            self.fields.iter().map(|(k, v)| format!("{}:{v}", Value::from(k.as_str()))).collect();
        println!("{{{}}}", fields.join(","));
    }
}

/// Runs git in the directory holding the daemon binary, which finds the
/// checkout it was built from wherever this is run.
fn git(bin: &Path, args: &[&str]) -> Option<String> {
    let out =
        Command::new("git").arg("-C").arg(bin.parent()?).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
