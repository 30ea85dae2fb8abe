//! `mdsync scan`: what the scanner saw, per mailbox, as text or JSON. Read-only.

use std::path::Path;
use std::process::ExitCode;

use mdsync::progress::NoProgress;
use mdsync::scan::{self, ScanOptions};
use mdsync::storage::maildir::layout::Layout;
use mdsync::storage::mdbox::health::{self, Health};
use mdsync::storage::mdbox::layout as mdbox_layout;
use mdsync::storage::mdbox::store::Store;
use mdsync::table::{MailTable, MailboxTable};

/// Runs `mdsync scan`.
pub fn run(path: &Path, layout: Option<Layout>, json: bool) -> anyhow::Result<ExitCode> {
    if !path.is_dir() {
        anyhow::bail!("{}: not a directory", path.display());
    }
    let options = ScanOptions {
        layout,
        ..ScanOptions::default()
    };
    let mdbox = mdbox_layout::is_mdbox(path);
    let (table, health) = if mdbox {
        let store = Store::new(path);
        let table = scan::mdbox::scan(path, &options, &NoProgress, &store)?;
        (table, Some(health::check(path)?))
    } else {
        (scan::scan(path, &options, &NoProgress)?, None)
    };
    if json {
        let mut value = to_json(path, &table);
        value["format"] = if mdbox { "mdbox" } else { "maildir" }.into();
        if let Some(h) = &health {
            value["health"] = serde_json::to_value(h)?;
        }
        println!("{value}");
    } else {
        let kind = if mdbox {
            "mdbox".to_string()
        } else {
            format!("{} layout", table.layout.as_str())
        };
        print_text(path, &table, &kind);
        if let Some(h) = &health {
            print_health(h);
        }
    }
    let troubled = table.mailboxes.iter().any(|m| m.broken.is_some())
        || health.as_ref().is_some_and(|h| !h.is_clean());
    Ok(if troubled {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn mailbox_json(m: &MailboxTable) -> serde_json::Value {
    let listed = m.listed_range();
    let mut anomalies: Vec<String> = m
        .anomalies
        .iter()
        .map(|a| format!("{}: {}", a.path, a.what))
        .collect();
    if let Some(why) = &m.broken {
        anomalies.insert(0, format!("broken: {why}"));
    }
    serde_json::json!({
        "name": m.name,
        "dir": m.dir,
        "messages": m.len(),
        "unnumbered": m.len() - listed.len(),
        "bytes": m.bytes(),
        "uid_validity": m.header.as_ref().map(|h| h.uid_validity),
        "uid_next": m.next_uid,
        "guid": m.guid_of_mailbox().map(|g| g.to_string()),
        "min_uid": m.msgs.uid[listed.clone()].first(),
        "max_uid": m.msgs.uid[listed].last(),
        "keywords": m.keywords.names.iter().flatten().collect::<Vec<_>>(),
        "anomalies": anomalies,
    })
}

fn to_json(path: &Path, table: &MailTable) -> serde_json::Value {
    serde_json::json!({
        "root": path.display().to_string(),
        "layout": table.layout.as_str(),
        "mailboxes": table.mailboxes.iter().map(mailbox_json).collect::<Vec<_>>(),
        "messages": table.message_count(),
        "bytes": table.mailboxes.iter().map(MailboxTable::bytes).sum::<u64>(),
        "table_bytes_per_message": (table.heap_bytes() as u64).checked_div(table.message_count()).unwrap_or(0),
        "anomalies": table.anomalies.iter().map(|a| format!("{}: {}", a.path, a.what)).collect::<Vec<_>>(),
    })
}

fn print_text(path: &Path, table: &MailTable, kind: &str) {
    println!("{} ({kind})", path.display());
    println!(
        "{:<32} {:>8} {:>12} {:>12} {:>10}  guid",
        "mailbox", "messages", "bytes", "uidvalidity", "uidnext"
    );
    for m in &table.mailboxes {
        let validity = m
            .header
            .as_ref()
            .map_or("-".to_string(), |h| h.uid_validity.to_string());
        let guid = m
            .guid_of_mailbox()
            .map_or("-".to_string(), |g| g.to_string());
        println!(
            "{:<32} {:>8} {:>12} {:>12} {:>10}  {guid}",
            m.name,
            m.len(),
            m.bytes(),
            validity,
            m.next_uid
        );
        if let Some(why) = &m.broken {
            println!("  broken: {why}");
        }
        for a in &m.anomalies {
            println!("  {}: {}", a.path, a.what);
        }
    }
    for a in &table.anomalies {
        println!("  {}: {}", a.path, a.what);
    }
    let bytes: u64 = table.mailboxes.iter().map(MailboxTable::bytes).sum();
    println!(
        "total: {} mailboxes, {} messages, {} bytes",
        table.mailboxes.len(),
        table.message_count(),
        bytes
    );
}

fn print_health(h: &Health) {
    println!(
        "storage: {} m.N files, {} bytes; {} messages stored, {} bytes referenced, \
         {} bytes wasted (doveadm purge reclaims them), {} with refcount 0",
        h.files, h.file_bytes, h.map_entries, h.referenced_bytes, h.wasted_bytes, h.refcount_zero
    );
    let problems = [
        ("map entry past a file's end", &h.past_end),
        ("unreadable file", &h.unreadable),
        ("refcount mismatch", &h.refcount_mismatch),
        ("mailbox record without map entry", &h.dangling),
    ];
    for (what, items) in problems {
        for item in items {
            println!("  {what}: {item}");
        }
    }
    for (at, guid) in &h.unreferenced {
        println!("  record no index references: {at} guid {guid}");
    }
    if h.is_clean() {
        println!("storage: healthy");
    }
}
