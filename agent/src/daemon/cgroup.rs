//! Selectors from a process's control group (`/proc/<pid>/cgroup`): the system unit it runs
//! in (`systemd:unit`) and the docker or podman container it is in (`docker:id`,
//! `podman:id`), read from the path alone, with no call to systemd or a container daemon.
//!
//! Only what an unprivileged process cannot forge counts. Moving a process into a cgroup
//! needs write access to the target, and the cgroups of system units and containers belong
//! to root; but a service with `Delegate=yes` (and every user's `user@<uid>.service`) owns
//! the subtree below its own cgroup and may create cgroups there with any name. So:
//! - the unit is the *outermost* unit in the path, as systemd's `GetUnitByPID` answers:
//!   `/system.slice/mosquitto.service/worker` is `mosquitto.service`, and a user's own
//!   `…/user@1000.service/app.slice/mosquitto.service` is `user@1000.service`;
//! - the container is the outermost container cgroup, and none is taken from inside a
//!   user's manager (`user@<uid>.service`), where a user could name a cgroup after someone
//!   else's container (rootless containers get no container selector).

use proto::Selector;

/// The selectors the cgroup file's text gives, none when it names no unit or container.
pub fn selectors(cgroup_file: &str) -> Vec<Selector> {
    let Some(path) = systemd_path(cgroup_file) else {
        return Vec::new();
    };
    let mut selectors = Vec::new();
    let unit = unit(path);
    if let Some(unit) = unit {
        selectors.push(Selector::observed("systemd", "unit", unit));
    }
    let in_user_manager = unit.is_some_and(|u| u.starts_with("user@"));
    if !in_user_manager {
        if let Some((runtime, id)) = container(path) {
            selectors.push(Selector::observed(runtime, "id", id));
        }
    }
    selectors
}

/// The path in the hierarchy systemd keeps its units in: `name=systemd` (cgroup v1 and the
/// hybrid layout), else the unified one (`0::`, cgroup v2).
fn systemd_path(cgroup_file: &str) -> Option<&str> {
    let mut unified = None;
    for line in cgroup_file.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers == "name=systemd" {
            return Some(path);
        }
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        }
    }
    unified
}

/// The outermost `.service` or `.scope` in the path.
fn unit(path: &str) -> Option<&str> {
    path.split('/').find(|c| proto::is_unit_name(c))
}

/// The outermost container cgroup: `docker-<id>.scope` and `libpod-<id>.scope` (systemd
/// cgroup driver), `/docker/<id>` and `/libpod_parent/libpod-<id>` (cgroupfs driver).
fn container(path: &str) -> Option<(&'static str, &str)> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for (i, component) in components.iter().enumerate() {
        let scoped = |prefix: &str| {
            component
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(".scope"))
                .filter(|id| proto::is_container_id(id))
        };
        if let Some(id) = scoped("docker-") {
            return Some(("docker", id));
        }
        if let Some(id) = scoped("libpod-") {
            return Some(("podman", id));
        }
        let parent = i.checked_sub(1).map(|p| components[p]);
        if parent == Some("docker") && proto::is_container_id(component) {
            return Some(("docker", component));
        }
        if parent == Some("libpod_parent") {
            if let Some(id) = component
                .strip_prefix("libpod-")
                .filter(|id| proto::is_container_id(id))
            {
                return Some(("podman", id));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904c3d3b51a2c1e8e1f0a8d2e71";
    const OTHER: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn texts(cgroup_file: &str) -> Vec<String> {
        selectors(cgroup_file)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_outermost_unit_and_container_are_the_selectors() {
        let cases: Vec<(String, Vec<String>)> = vec![
            // cgroup v2, a system service and a worker cgroup it made below itself.
            (
                "0::/system.slice/mosquitto.service\n".into(),
                vec!["systemd:unit:mosquitto.service".into()],
            ),
            (
                "0::/system.slice/historian.service/worker/fake.service\n".into(),
                vec!["systemd:unit:historian.service".into()],
            ),
            // systemd-run --scope.
            (
                "0::/system.slice/run-r3f1e2.scope\n".into(),
                vec!["systemd:unit:run-r3f1e2.scope".into()],
            ),
            // Hybrid layout: the name=systemd hierarchy is systemd's, whatever 0:: says.
            (
                "12:memory:/x\n1:name=systemd:/system.slice/opcua.service\n0::/\n".into(),
                vec!["systemd:unit:opcua.service".into()],
            ),
            // Docker with the systemd driver: the scope is both the unit and the container.
            (
                format!("0::/system.slice/docker-{ID}.scope\n"),
                vec![
                    format!("systemd:unit:docker-{ID}.scope"),
                    format!("docker:id:{ID}"),
                ],
            ),
            // A container that runs systemd and names a cgroup after another container.
            (
                format!("0::/system.slice/docker-{ID}.scope/docker-{OTHER}.scope\n"),
                vec![
                    format!("systemd:unit:docker-{ID}.scope"),
                    format!("docker:id:{ID}"),
                ],
            ),
            // Docker with the cgroupfs driver, podman with either.
            (
                format!("0::/docker/{ID}\n"),
                vec![format!("docker:id:{ID}")],
            ),
            (
                format!("0::/machine.slice/libpod-{ID}.scope/container\n"),
                vec![
                    format!("systemd:unit:libpod-{ID}.scope"),
                    format!("podman:id:{ID}"),
                ],
            ),
            (
                format!("0::/libpod_parent/libpod-{ID}\n"),
                vec![format!("podman:id:{ID}")],
            ),
            // A user's own manager: its unit is user@1000.service, and a cgroup the user
            // named after a container gives nothing.
            (
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/app.slice/libpod-{ID}.scope\n"
                ),
                vec!["systemd:unit:user@1000.service".into()],
            ),
            (
                "0::/user.slice/user-1000.slice/session-3.scope\n".into(),
                vec!["systemd:unit:session-3.scope".into()],
            ),
            // No unit, no container, nothing readable.
            ("0::/\n".into(), vec![]),
            ("0::/init.scope.d/x\n".into(), vec![]),
            (format!("0::/docker/{}\n", &ID[..12]), vec![]),
            ("garbage".into(), vec![]),
            (String::new(), vec![]),
        ];
        for (text, expected) in cases {
            assert_eq!(texts(&text), expected, "{text:?}");
            for selector in selectors(&text) {
                // What the agent produces, the issuer accepts in an entry.
                Selector::new(&selector.to_string()).expect("a valid selector");
            }
        }
    }
}
