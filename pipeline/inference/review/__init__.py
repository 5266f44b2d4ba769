"""The review page of a diagnosis (OUT/index.html) with its 3D views, and the tools that test it.

`page.write_review_page` writes the page; `viewer_data` the per-study volumes of the 3D view;
`niivue` provisions the NiiVue viewer offline; `chromium` drives headless Chromium (tests,
benchmark, README screenshots).
"""
