//! Who may do what through the API: the permission table of CONTRACT §3, checked before a
//! route's handler runs. What an owner may see or change beyond its role (its own devices,
//! alerts and coverage only) is the handlers' scope check ([`Principal::scope`]).
//!
//! [`Principal::scope`]: crate::domain::role::Principal::scope

use crate::domain::role::Role;

/// What a route needs, checked before its handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Action {
    ReadDevices,
    RegisterDevice,
    RecordCertificate,
    ReadAlerts,
    AckAlert,
    StreamAlerts,
    ReadCoverage,
    ImportDevices,
    ImportVerifications,
    Metrics,
    Me,
}

/// The permission table (CONTRACT §3; admin reads everything and registers devices, but
/// never records certificates or acknowledges alerts; `/metrics` is for the bureau's roles,
/// not owners).
pub(super) fn allowed(role: Role, action: Action) -> bool {
    use Action::*;
    use Role::*;
    match action {
        ReadDevices => true,
        RegisterDevice | ImportDevices => matches!(role, Owner | Admin),
        RecordCertificate | ImportVerifications => role == Verifier,
        ReadAlerts | StreamAlerts | ReadCoverage => matches!(role, Owner | Supervisor | Admin),
        AckAlert => role == Supervisor,
        Metrics => matches!(role, Verifier | Supervisor | Admin),
        Me => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONTRACT §3 written out, one row per action: owner, verifier, supervisor, admin.
    const TABLE: [(Action, [bool; 4]); 11] = [
        (Action::ReadDevices, [true, true, true, true]),
        (Action::RegisterDevice, [true, false, false, true]),
        (Action::ImportDevices, [true, false, false, true]),
        (Action::RecordCertificate, [false, true, false, false]),
        (Action::ImportVerifications, [false, true, false, false]),
        (Action::ReadAlerts, [true, false, true, true]),
        (Action::StreamAlerts, [true, false, true, true]),
        (Action::ReadCoverage, [true, false, true, true]),
        (Action::AckAlert, [false, false, true, false]),
        (Action::Metrics, [false, true, true, true]),
        (Action::Me, [true, true, true, true]),
    ];

    #[test]
    fn the_table_is_contract_section_3() {
        let roles = [Role::Owner, Role::Verifier, Role::Supervisor, Role::Admin];
        for (action, row) in TABLE {
            for (role, want) in roles.into_iter().zip(row) {
                assert_eq!(allowed(role, action), want, "{role:?} {action:?}");
            }
        }
    }

    #[test]
    fn only_verifiers_record_certificates_and_owners_never_do() {
        for role in Role::ALL {
            assert_eq!(
                allowed(role, Action::RecordCertificate),
                role == Role::Verifier
            );
            assert_eq!(
                allowed(role, Action::ImportVerifications),
                role == Role::Verifier
            );
        }
        assert!(
            !allowed(Role::Admin, Action::AckAlert),
            "admin never acknowledges"
        );
    }
}
