//! The status screen as text: a pure function of the [`Summary`], the time now and the
//! [`Style`]. Absolute times stay in `-o json|yaml`; the screen shows ages.

use std::fmt::Write as _;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::{Section, Summary};
use crate::style::{bytes, cell, duration, toned, Style, Table, Tone};

/// Width of the labels of the key-value lines.
const LABEL: usize = 13;
/// Characters of a template hash shown (enough to tell two apart).
const HASH: usize = 10;

/// The status screen of `summary` at `now`.
pub fn render(summary: &Summary, now: Timestamp, style: &Style) -> String {
    let mut out = String::new();
    let age = |t: &Option<Time>| match t {
        Some(t) => duration(now.as_second() - t.0.as_second()),
        None => "-".to_string(),
    };
    let kv = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(out, "  {label:<LABEL$}{value}");
    };

    // Headline: which cluster, its phase, whether status is current.
    let phase = summary.phase.as_deref().unwrap_or("(no status yet)");
    let _ = write!(
        out,
        "{} {}/{}  {}",
        style.paint("DchatCluster", Tone::Heading),
        summary.namespace,
        summary.name,
        style.paint(phase, phase_tone(summary.phase.as_deref()))
    );
    match (summary.generation, summary.observed_generation) {
        (Some(g), Some(o)) if o < g => {
            let _ = write!(
                out,
                "  {}",
                style.paint(
                    &format!("(status is of generation {o}; the spec is at {g})"),
                    Tone::Notice
                )
            );
        }
        _ => {}
    }
    out.push('\n');
    let serving = match (&summary.serving_version, &summary.active_slot) {
        (Some(version), Some(slot)) => format!("{version} serving on slot {slot}"),
        (Some(version), None) => format!("{version} serving"),
        _ => "nothing serving yet".to_string(),
    };
    kv(
        &mut out,
        "version",
        &format!("{serving} (spec.version {})", summary.desired_version),
    );
    if let (Some(ready), Some(replicas)) = (summary.ready_replicas, summary.replicas) {
        let tone = if ready >= replicas && replicas > 0 {
            Tone::Good
        } else {
            Tone::Notice
        };
        kv(
            &mut out,
            "relays",
            &style.paint(&format!("{ready}/{replicas} ready"), tone),
        );
    }
    let control = &summary.control;
    if !control.paused_by.is_empty() || control.paused_condition.as_deref() == Some("True") {
        let by = if control.paused_by.is_empty() {
            "by the operator".to_string()
        } else {
            format!("by {}", control.paused_by.join(" and "))
        };
        let seen = match control.paused_condition.as_deref() {
            Some(status) => format!("condition Paused {status}"),
            None => "no Paused condition yet".to_string(),
        };
        kv(
            &mut out,
            "paused",
            &format!("{} ({seen})", style.paint(&by, Tone::Notice)),
        );
    }
    if !control.hibernated_by.is_empty() {
        kv(
            &mut out,
            "hibernation",
            &style.paint(
                &format!("requested by {}", control.hibernated_by.join(" and ")),
                Tone::Notice,
            ),
        );
    }
    if control.restart_requested.is_some() || control.restart_acted_on.is_some() {
        let requested = control.restart_requested.as_deref().unwrap_or("-");
        let acted = control.restart_acted_on.as_deref().unwrap_or("not yet");
        kv(
            &mut out,
            "restart",
            &format!("requested {requested}; acted on {acted}"),
        );
    }

    out.push('\n');
    heading(&mut out, style, "Conditions");
    if summary.conditions.is_empty() {
        out.push_str("  none reported yet\n");
    } else {
        let mut table = Table::new(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
        for c in &summary.conditions {
            table.row(vec![
                cell(&c.type_),
                toned(&c.status, condition_tone(&c.type_, &c.status)),
                cell(&c.reason),
                cell(age(&Some(c.since.clone()))),
                cell(&c.message),
            ]);
        }
        out.push_str(&table.render(style));
    }

    out.push('\n');
    heading(&mut out, style, "Slots");
    match &summary.slots {
        Section::Shown(slots) if slots.is_empty() => out.push_str("  no relay StatefulSets yet\n"),
        Section::Shown(slots) => {
            let mut table = Table::new(&["SLOT", "ROLE", "VERSION", "READY", "TEMPLATE"]);
            for s in slots {
                let ready_tone = if s.ready >= s.desired {
                    Tone::Good
                } else {
                    Tone::Notice
                };
                table.row(vec![
                    cell(&s.slot),
                    match s.role.as_str() {
                        "serving" => toned(&s.role, Tone::Good),
                        "rollout" => toned(&s.role, Tone::Notice),
                        _ => cell(&s.role),
                    },
                    cell(s.version.as_deref().unwrap_or("-")),
                    toned(format!("{}/{}", s.ready, s.desired), ready_tone),
                    cell(
                        s.template_hash
                            .as_deref()
                            .map(|h| h.chars().take(HASH).collect::<String>())
                            .unwrap_or_else(|| "-".into()),
                    ),
                ]);
            }
            out.push_str(&table.render(style));
        }
        Section::Unavailable { unavailable } => unavailable_line(&mut out, style, unavailable),
    }

    out.push('\n');
    heading(&mut out, style, "Rollout");
    match &summary.rollout {
        None => out.push_str("  none yet\n"),
        Some(r) => {
            let from = r.from_version.as_deref().unwrap_or("(nothing)");
            let step = style.paint(&r.step, step_tone(&r.step, r.in_flight));
            let timing = if r.in_flight {
                format!(
                    " for {} (started {} ago)",
                    age(&r.step_started_at),
                    age(&r.started_at)
                )
            } else {
                format!(" {} ago", age(&r.step_started_at))
            };
            let _ = writeln!(
                out,
                "  {from} -> {} in slot {}: {step}{timing}",
                r.target_version, r.slot
            );
            if let Some(waiting) = &r.waiting_for {
                kv(&mut out, "waiting for", waiting);
            }
            if !r.message.is_empty() {
                kv(&mut out, "message", &r.message);
            }
        }
    }

    out.push('\n');
    let autoscaler = match &summary.autoscaler {
        Section::Shown(None) => "none (spec.autoscaling off)".to_string(),
        Section::Shown(Some(h)) => format!(
            "HPA {}: {} current, {} desired, min {}, max {}",
            h.name,
            number(h.current),
            number(h.desired),
            number(h.min),
            h.max
        ),
        Section::Unavailable { unavailable } => {
            style.paint(&format!("unavailable: {unavailable}"), Tone::Faint)
        }
    };
    kv(&mut out, "autoscaler", &autoscaler);
    let budget = match &summary.disruption_budget {
        Section::Shown(None) => "none (one relay, or spec.disruptionBudget empty)".to_string(),
        Section::Shown(Some(b)) => {
            let rule = match (&b.min_available, &b.max_unavailable) {
                (Some(min), _) => format!("minAvailable {min}"),
                (None, Some(max)) => format!("maxUnavailable {max}"),
                (None, None) => "no rule".to_string(),
            };
            let allowed = b.disruptions_allowed.unwrap_or(0);
            let disruptions = style.paint(
                &format!(
                    "{allowed} disruption{} allowed",
                    if allowed == 1 { "" } else { "s" }
                ),
                if allowed > 0 {
                    Tone::Good
                } else {
                    Tone::Notice
                },
            );
            format!(
                "PDB {}: {rule}; {} healthy of {} needed, {disruptions}",
                b.name,
                number(b.current_healthy),
                number(b.desired_healthy)
            )
        }
        Section::Unavailable { unavailable } => {
            style.paint(&format!("unavailable: {unavailable}"), Tone::Faint)
        }
    };
    kv(&mut out, "disruptions", &budget);

    out.push('\n');
    heading(&mut out, style, "Backups");
    let backups = &summary.backups;
    if !backups.configured {
        out.push_str("  not configured (spec.backup)\n");
    } else {
        let schedule = match (&backups.schedule, backups.suspended) {
            (None, _) => "on demand only (no spec.backup.schedule)".to_string(),
            (Some(cron), true) => format!("\"{cron}\" UTC, suspended"),
            (Some(cron), false) => match &backups.next_scheduled_at {
                Some(next) => {
                    let seconds = next.0.as_second() - now.as_second();
                    let when = if seconds >= 0 {
                        format!("in {}", duration(seconds))
                    } else {
                        format!("overdue by {}", duration(seconds))
                    };
                    format!("\"{cron}\" UTC, next {when} ({})", next.0)
                }
                None => format!("\"{cron}\" UTC"),
            },
        };
        kv(&mut out, "schedule", &schedule);
        let last = match (&backups.last_successful, &backups.last_successful_at) {
            (Some(name), at @ Some(_)) => format!("{name} ({} ago)", age(at)),
            (Some(name), None) => name.clone(),
            (None, _) => style.paint("none yet", Tone::Notice),
        };
        kv(&mut out, "last success", &last);
    }
    match &backups.recent {
        Section::Shown(list) if list.is_empty() => {
            if backups.configured {
                out.push_str("  no DchatBackups yet\n");
            }
        }
        Section::Shown(list) => {
            let mut table = Table::new(&["NAME", "PHASE", "AGE", "SIZE", "ERROR"]);
            for b in list {
                table.row(vec![
                    cell(&b.name),
                    toned(&b.phase, backup_tone(&b.phase)),
                    cell(age(&b.created)),
                    cell(b.size_bytes.map(bytes).unwrap_or_else(|| "-".into())),
                    cell(b.error.as_deref().unwrap_or("")),
                ]);
            }
            out.push_str(&table.render(style));
        }
        Section::Unavailable { unavailable } => unavailable_line(&mut out, style, unavailable),
    }

    out.push('\n');
    heading(&mut out, style, "Events");
    match &summary.events {
        Section::Shown(list) if list.is_empty() => out.push_str("  none\n"),
        Section::Shown(list) => {
            let mut table = Table::new(&["AGE", "TYPE", "REASON", "MESSAGE"]);
            for e in list {
                let when = if e.count > 1 {
                    format!("{} (x{})", age(&e.time), e.count)
                } else {
                    age(&e.time)
                };
                table.row(vec![
                    cell(when),
                    if e.type_ == "Warning" {
                        toned(&e.type_, Tone::Notice)
                    } else {
                        cell(&e.type_)
                    },
                    cell(&e.reason),
                    cell(&e.message),
                ]);
            }
            out.push_str(&table.render(style));
        }
        Section::Unavailable { unavailable } => unavailable_line(&mut out, style, unavailable),
    }
    out
}

fn heading(out: &mut String, style: &Style, title: &str) {
    out.push_str(&style.paint(title, Tone::Heading));
    out.push('\n');
}

fn unavailable_line(out: &mut String, style: &Style, why: &str) {
    out.push_str("  ");
    out.push_str(&style.paint(&format!("unavailable: {why}"), Tone::Faint));
    out.push('\n');
}

fn number(n: Option<i32>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
}

/// Colour of a phase: green serving as desired, red broken, yellow anything between.
pub fn phase_tone(phase: Option<&str>) -> Tone {
    match phase {
        Some("Running") => Tone::Good,
        Some("Degraded" | "Failed" | "RolledBack") => Tone::Bad,
        _ => Tone::Notice,
    }
}

fn condition_tone(type_: &str, status: &str) -> Tone {
    // Degraded and Stalled are "abnormal-true" conditions (kstatus): True is bad.
    let abnormal_true = matches!(type_, "Degraded" | "Stalled");
    let informative = matches!(type_, "Progressing" | "Reconciling" | "Paused");
    match (status, abnormal_true, informative) {
        ("True", true, _) => Tone::Bad,
        ("False", true, _) => Tone::Good,
        ("True", _, true) => Tone::Notice,
        (_, _, true) => Tone::Faint,
        ("True", _, _) => Tone::Good,
        ("False", _, _) => Tone::Bad,
        _ => Tone::Notice,
    }
}

fn step_tone(step: &str, in_flight: bool) -> Tone {
    match step {
        "Complete" => Tone::Good,
        "Failed" | "RolledBack" | "Aborted" | "HandoverFailed" => Tone::Bad,
        _ if in_flight => Tone::Notice,
        _ => Tone::Faint,
    }
}

fn backup_tone(phase: &str) -> Tone {
    match phase {
        "Completed" => Tone::Good,
        "Failed" => Tone::Bad,
        _ => Tone::Notice,
    }
}
