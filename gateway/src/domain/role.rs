//! Who calls the API (CONTRACT §3): the four roles and the principal a token stands for.

use calwatch_protocol::Id;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An instrument owner: its own devices, alerts, coverage; registers its devices.
    Owner,
    /// A verification officer: records certificates; reads devices.
    Verifier,
    /// The bureau's supervisor: reads everything, acknowledges alerts.
    Supervisor,
    /// Operates the registry: registers devices of any owner; reads everything; cannot
    /// record certificates or acknowledge alerts.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Verifier, Role::Supervisor, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Verifier => "verifier",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Principal {
    /// The token's name (the actor in the audit log).
    pub name: String,
    pub role: Role,
    /// For owners: the owner id every request is scoped to.
    pub owner: Option<Id>,
}

impl Principal {
    /// Whether this caller may see data of `owner`.
    pub(crate) fn sees(&self, owner: &str) -> bool {
        match self.role {
            Role::Owner => self.owner.as_ref().is_some_and(|o| o.as_str() == owner),
            _ => true,
        }
    }

    /// The owner this caller is confined to (`None`: sees every owner).
    pub(crate) fn scope(&self) -> Option<&Id> {
        match self.role {
            Role::Owner => self.owner.as_ref(),
            _ => None,
        }
    }

    /// `name` as the audit log's actor: `token:<name>`.
    pub(crate) fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}
