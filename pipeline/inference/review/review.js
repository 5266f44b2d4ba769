// The review page's behaviour: sort and filter the slice table, load a study's 3D view on open.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("lgg-config").textContent);

  // ---------------------------------------------------------------- the slice table
  const table = document.getElementById("slices");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const search = document.getElementById("filter-text");
  const decision = document.getElementById("filter-decision");
  const shown = document.getElementById("shown");

  function applyFilter() {
    const words = search.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = decision.value;
    let n = 0;
    for (const row of rows) {
      const text = row.dataset.search;
      const ok = (!wanted || row.dataset.decision === wanted) && words.every((w) => text.includes(w));
      row.hidden = !ok;
      if (ok) n += 1;
    }
    shown.textContent = n + " of " + rows.length + " slices shown";
  }
  search.addEventListener("input", applyFilter);
  decision.addEventListener("change", applyFilter);

  function sortBy(th) {
    const index = th.cellIndex;
    const numeric = th.dataset.type === "num";
    const ascending = th.getAttribute("aria-sort") !== "ascending";
    for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const key = (row) => row.cells[index].dataset.value ?? row.cells[index].textContent;
    const sorted = rows.slice().sort((a, b) => {
      let x = key(a), y = key(b);
      if (numeric) {
        x = x === "" ? -Infinity : Number(x);
        y = y === "" ? -Infinity : Number(y);
        return ascending ? x - y : y - x;
      }
      const c = String(x).localeCompare(String(y), undefined, { numeric: true });
      return ascending ? c : -c;
    });
    for (const row of sorted) body.appendChild(row);
  }
  for (const th of table.tHead.rows[0].cells) {
    if (th.dataset.type) th.addEventListener("click", () => sortBy(th));
  }
  applyFilter();

  // ---------------------------------------------------------------- the 3D views
  const loaded = {};
  function loadScript(src) {
    if (!loaded[src]) {
      loaded[src] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = () => reject(new Error("cannot load " + src));
        document.head.appendChild(script);
      });
    }
    return loaded[src];
  }

  async function openViewer(details) {
    if (details.dataset.state) return;
    const status = details.querySelector(".viewer-status");
    details.dataset.state = "loading";
    status.textContent = "loading the viewer and this study's volumes ...";
    const t0 = performance.now();
    const timings = {};
    const mark = (name) => { timings[name] = Math.round(performance.now() - t0); };
    try {
      await loadScript(config.niivue);
      mark("niivue_script");
      await loadScript(details.dataset.volumes);
      mark("volumes_script");
      const data = window.LGG_VOLUMES[details.dataset.key];
      const nv = new window.niivue.Niivue({
        backColor: [0, 0, 0, 1],
        crosshairColor: [0.2, 0.8, 1, 1],
        show3Dcrosshair: true,
        isColorbar: false,
        logLevel: "error",
        multiplanarShowRender: window.niivue.SHOW_RENDER.ALWAYS,
      });
      await nv.attachToCanvas(details.querySelector("canvas"));
      mark("webgl");
      const flair = await window.niivue.NVImage.loadFromBase64({
        base64: data.flair, name: details.dataset.key + "_flair.nii.gz", colormap: "gray",
      });
      const mask = await window.niivue.NVImage.loadFromBase64({
        base64: data.mask, name: details.dataset.key + "_mask.nii.gz", colormap: "red",
        opacity: 0.7, cal_min: 0.5, cal_max: 1,
      });
      mark("decoded");
      nv.addVolume(flair);
      nv.addVolume(mask);
      nv.setSliceType(nv.sliceTypeMultiplanar);
      nv.scene.crosshairPos = nv.vox2frac(data.center);
      nv.updateGLVolume();
      const opacity = details.querySelector("input.opacity");
      opacity.addEventListener("input", () => { nv.setOpacity(1, Number(opacity.value)); });
      const layout = details.querySelector("select.layout");
      layout.addEventListener("change", () => { nv.setSliceType(Number(layout.value)); });
      mark("drawn");
      details.viewer = nv;
      details.timings = timings;
      details.dataset.state = "ready";
      status.textContent = data.mask_voxels + " mask voxels; drag to move the crosshair, " +
        "right-drag in 3D to rotate.";
    } catch (error) {
      details.dataset.state = "failed";
      status.textContent = "the 3D view could not be shown: " + error.message;
      throw error;
    }
  }
  for (const details of document.querySelectorAll("details.viewer[data-volumes]")) {
    details.addEventListener("toggle", () => {
      details.closest(".card").classList.toggle("open", details.open);
      if (details.open) openViewer(details);
    });
  }
  window.lggOpenViewer = openViewer;
})();
