//! The SQL text of the protocol, embedded at build time from `sql/` (the one place it lives).
//! Python reads the same text through the native module, so both paths run identical statements.

include!(concat!(env!("OUT_DIR"), "/sql_files.rs"));

/// The text of a named statement of `sql/statements/`; panics on a name that does not exist,
/// which the unit tests below rule out for every name the engine uses.
pub const fn statement(name: &str) -> &'static str {
    let mut i = 0;
    while i < STATEMENTS.len() {
        if const_eq(STATEMENTS[i].0, name) {
            return STATEMENTS[i].1;
        }
        i += 1;
    }
    panic!("no such SQL statement")
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

pub const SEND_COMMANDS: &str = statement("send_commands");
pub const CLAIM_COMMANDS: &str = statement("claim_commands");
pub const FINISH_COMMANDS: &str = statement("finish_commands");
pub const EXTEND_LEASES: &str = statement("extend_leases");
pub const RELEASE_COMMANDS: &str = statement("release_commands");
pub const ENSURE_QUEUE: &str = statement("ensure_queue");
pub const REFRESH_STATISTICS: &str = statement("refresh_statistics");

/// Queue of a domain's commands (the predecessor's naming).
pub fn command_queue(domain: &str) -> String {
    format!("{domain}__commands")
}

/// NOTIFY channel that wakes the workers of a queue (the predecessor's naming).
pub fn notify_channel(queue: &str) -> String {
    format!("pgmq_notify_{queue}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, (version, _, text)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(!text.trim().is_empty());
        }
    }

    #[test]
    fn statements_are_single_and_use_versioned_functions() {
        for (name, text) in STATEMENTS.iter().filter(|(_, text)| !text.contains("$$")) {
            assert!(
                !text.trim_end().trim_end_matches(';').contains(';'),
                "{name} holds two statements"
            );
        }
        assert!(SEND_COMMANDS.contains("send_commands_v2"));
        assert!(FINISH_COMMANDS.contains("finish_commands_v1"));
    }

    #[test]
    fn queue_and_channel_names() {
        assert_eq!(command_queue("orders"), "orders__commands");
        assert_eq!(notify_channel("orders__commands"), "pgmq_notify_orders__commands");
    }
}
