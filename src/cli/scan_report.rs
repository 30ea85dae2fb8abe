//! `mdsync scan`: what the scanner saw, per mailbox, as text or JSON. Read-only.

use std::path::Path;
use std::process::ExitCode;

use mdsync::progress::NoProgress;
use mdsync::scan::{self, ScanOptions};
use mdsync::storage::maildir::layout::Layout;
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
    let table = scan::scan(path, &options, &NoProgress)?;
    if json {
        println!("{}", to_json(path, &table));
    } else {
        print_text(path, &table);
    }
    let troubled = table.mailboxes.iter().any(|m| m.broken.is_some());
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

fn print_text(path: &Path, table: &MailTable) {
    println!("{} ({} layout)", path.display(), table.layout.as_str());
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
