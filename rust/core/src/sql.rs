//! The SQL text of the protocol, embedded at build time from `sql/` (the one place it lives).
//! Python reads the same text through the native module, so both paths run identical statements.

/// Numbered schema migrations, applied in order by `setup_database()`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "commandbus_schema",
        include_str!("../../../sql/migrations/V001__commandbus_schema.sql"),
    ),
    (
        2,
        "protocol",
        include_str!("../../../sql/migrations/V002__protocol.sql"),
    ),
];

pub const SEND_COMMANDS: &str = include_str!("../../../sql/statements/send_commands.sql");
pub const CLAIM_COMMANDS: &str = include_str!("../../../sql/statements/claim_commands.sql");
pub const FINISH_COMMANDS: &str = include_str!("../../../sql/statements/finish_commands.sql");
pub const EXTEND_LEASES: &str = include_str!("../../../sql/statements/extend_leases.sql");
pub const RELEASE_COMMANDS: &str = include_str!("../../../sql/statements/release_commands.sql");
pub const ENSURE_QUEUE: &str = include_str!("../../../sql/statements/ensure_queue.sql");
pub const REFRESH_STATISTICS: &str = include_str!("../../../sql/statements/refresh_statistics.sql");

/// Every named statement, for the Python side (`_native.statements()`).
pub const STATEMENTS: &[(&str, &str)] = &[
    ("send_commands", SEND_COMMANDS),
    ("claim_commands", CLAIM_COMMANDS),
    ("finish_commands", FINISH_COMMANDS),
    ("extend_leases", EXTEND_LEASES),
    ("release_commands", RELEASE_COMMANDS),
    ("ensure_queue", ENSURE_QUEUE),
    ("refresh_statistics", REFRESH_STATISTICS),
    ("get_command", include_str!("../../../sql/statements/get_command.sql")),
    (
        "command_exists",
        include_str!("../../../sql/statements/command_exists.sql"),
    ),
    (
        "query_commands",
        include_str!("../../../sql/statements/query_commands.sql"),
    ),
    ("audit_trail", include_str!("../../../sql/statements/audit_trail.sql")),
    (
        "schema_exists",
        include_str!("../../../sql/statements/schema_exists.sql"),
    ),
];

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
        for (name, text) in STATEMENTS {
            assert!(
                !text.trim_end().trim_end_matches(';').contains(';'),
                "{name} holds two statements"
            );
        }
        assert!(SEND_COMMANDS.contains("send_commands_v1"));
        assert!(FINISH_COMMANDS.contains("finish_commands_v1"));
    }

    #[test]
    fn queue_and_channel_names() {
        assert_eq!(command_queue("orders"), "orders__commands");
        assert_eq!(notify_channel("orders__commands"), "pgmq_notify_orders__commands");
    }
}
