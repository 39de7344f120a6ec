//! A first end-to-end pass: both backends get traffic at a 50 % split.

mod common;

use common::*;

#[tokio::test]
async fn split_reaches_both_backends() {
    let legacy = Backend::named("legacy").await;
    let vastai = Backend::named("vastai").await;
    let vs = Vastshift::start(&config(
        &legacy.url(),
        &vastai.url(),
        "[split]\npercent = 50\n",
    ))
    .await;
    let c = client();
    for _ in 0..40 {
        let r = c.get(vs.url("/x?y=1")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let by = served_by(&r);
        let text = r.text().await.unwrap();
        assert_eq!(by, text);
    }
    assert!(legacy.count() > 0 && vastai.count() > 0);
    assert_eq!(legacy.count() + vastai.count(), 40);
    vs.stop().await;
}
