//! snf-image's `CLOUD_INIT` property and `cloud_userdata` parameter: what the create plan
//! gives cloud-init instead of editing the guest's files (pure over the parameters).

use super::params::{self, Params};

/// The seed's user-data in the guest (the helper's `cloud_init::USER_DATA`), which
/// `cloud_userdata` is uploaded to.
pub const USER_DATA_PATH: &str = "/var/lib/cloud/seed/nocloud-net/user-data";

/// True if `img_properties` sets `CLOUD_INIT` (read as snf-image reads a boolean).
pub fn enabled(params: &Params) -> bool {
    params.properties.get("CLOUD_INIT").is_some_and(|v| params::yes(v))
}

/// True if `img_properties` sets `NM_NETWORKING`.
pub fn network_manager(params: &Params) -> bool {
    params.properties.get("NM_NETWORKING").is_some_and(|v| params::yes(v))
}

/// What the parameters ask that `CLOUD_INIT` unset leaves unused, for Ganeti's OS log.
pub fn warnings(params: &Params) -> Vec<String> {
    if params.cloud_userdata.is_some() && !enabled(params) {
        vec!["cloud_userdata ignored: img_properties does not set CLOUD_INIT".into()]
    } else {
        Vec::new()
    }
}
