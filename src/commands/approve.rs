//! `pii-vault approve REQUEST_ID --reason TEXT`: the second person of the
//! two-person rule. The database refuses an approval by the login that made
//! the request, of a request that is not pending, or of an expired one.

use crate::cli::{ApproveArgs, Cli};

pub async fn approve(cli: &Cli, args: &ApproveArgs) -> anyhow::Result<()> {
    let store = super::open_store(cli).await?;
    store
        .approve(
            args.request_id,
            &super::claimed_actor(args.actor.as_deref()),
            &args.reason,
        )
        .await?;
    eprintln!(
        "pii-vault: request {id} approved (recorded in the audit trail); its requester fetches it, once, \
         within 24 hours of the request, with `pii-vault reveal --request {id}`",
        id = args.request_id
    );
    Ok(())
}
