"""Stand-ins for the Slicer application pieces slicer-core lacks (Qt widgets, qt, ScriptedLoadableModule,
slicer.parameterNodeWrapper, SampleData), so BrainID.py's widget runs its real setup() on real MRML.

The widgets are built from BrainID.ui itself (names, classes, dynamic properties, initial state).
The parameter-node wrapper follows Slicer's rules where they matter here: typed fields with
defaults, values stored in the MRML parameter node, and `connectGui` binding a widget whose
`SlicerParameterName` property names a field, only for the widget/type pairs Slicer's own
connectors support (QCheckBox-bool, qMRMLNodeComboBox-node, QComboBox-Choice, QLineEdit-str).
"""

from __future__ import annotations

import contextlib
import types
import typing
import xml.etree.ElementTree as ET

import slicer


class FakeWidget:
    """The properties and methods BrainID touches, for any widget class in BrainID.ui."""

    def __init__(self, name, cls, props):
        self.name, self.cls, self._props = name, cls, props
        self.enabled, self.value, self.lines, self.items = True, 0, [], []
        self._text = props.get("text", "")
        self._checked = props.get("checked") == "true"
        self._index, self._node, self._listeners, self.checked_ids = -1, None, [], set()

    def connect(self, signal, slot):
        self._listeners.append(slot)

    def _changed(self):
        for slot in list(self._listeners):
            slot()

    # QCheckBox / QLineEdit / QLabel / QPushButton: a check box's state and a line edit's text notify
    # (from code or a "user" alike, as Qt's toggled / textChanged do); a button's or label's text does not
    checked = property(lambda self: self._checked, lambda self, v: self._set("_checked", bool(v)))
    text = property(lambda self: self._text, lambda self, v: self._set("_text", str(v), self.cls == "QLineEdit"))

    def _set(self, attr, value, notify=True):
        if getattr(self, attr) != value:
            setattr(self, attr, value)
            if notify:
                self._changed()

    def click(self):
        self._changed()

    # qMRMLNodeComboBox, qSlicerMarkupsPlaceWidget
    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        self._set("_node", node)

    # QComboBox
    currentIndex = property(lambda self: self._index, lambda self, v: self._set("_index", int(v)))

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self._index < 0:
            self._index = 0

    def clear(self):
        self.items, self._index, self.lines = [], -1, []

    def setItemData(self, *args):
        pass

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def setEditText(self, text):
        self.items.append((text, None))
        self.currentIndex = len(self.items) - 1

    count = property(lambda self: len(self.items))
    currentData = property(lambda self: self.items[self._index][1] if self._index >= 0 else None)
    currentText = property(lambda self: self.items[self._index][0] if self._index >= 0 else "")

    # QPlainTextEdit
    def appendPlainText(self, line):
        self.lines.append(line)

    # qMRMLCheckableNodeComboBox
    def check(self, *nodes):
        self.checked_ids = {n.GetID() for n in nodes}
        self._changed()

    def checkedNodes(self):
        scene = slicer.mrmlScene
        return [n for n in (scene.GetNodeByID(i) for i in sorted(self.checked_ids)) if n is not None]

    def property(self, name):  # QObject.property (last: the name shadows the builtin in this class body)
        return self._props.get(name)


def widgets_from_ui(path) -> types.SimpleNamespace:
    widgets = {}
    for w in ET.parse(path).getroot().iter("widget"):
        props = {p.get("name"): next((c.text or "") for c in p) for p in w.findall("property") if len(p)}
        widgets[w.get("name")] = FakeWidget(w.get("name"), w.get("class"), props)
    return types.SimpleNamespace(**widgets)


# ---------------------------------------------------------------- slicer.parameterNodeWrapper


class Choice:
    def __init__(self, choices):
        self.choices = tuple(choices)


def _field(hint):
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
    choice = next((a for a in getattr(hint, "__metadata__", ()) if isinstance(a, Choice)), None)
    return base, choice


def _is_node_type(t):
    return isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode)


CONNECTABLE = {"QCheckBox": lambda t, c: t is bool, "qMRMLNodeComboBox": lambda t, c: _is_node_type(t),
               "QComboBox": lambda t, c: c is not None, "QLineEdit": lambda t, c: t is str}


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: (*_field(hint), getattr(cls, name, None)) for name, hint in hints.items()}

    def get(self, name):
        t = fields[name][0]
        if _is_node_type(t):
            return self.parameterNode.GetNodeReference(name)
        raw = self.parameterNode.GetParameter(name)
        return raw == "True" if t is bool else t(raw)

    def set_(self, name, value):
        t, choice, _ = fields[name]
        if _is_node_type(t):
            if value is not None and not isinstance(value, t):
                raise ValueError(f"{name}: expected {t.__name__}, got {type(value).__name__}")
            self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if not isinstance(value, t) or (choice is not None and value not in choice.choices):
            raise ValueError(f"{name}: {value!r} is not a valid {t.__name__}")
        self.parameterNode.SetParameter(name, str(value))

    for name in fields:
        setattr(cls, name, property(lambda self, n=name: get(self, n), lambda self, v, n=name: set_(self, n, v)))

    def init(self, node):
        self.parameterNode = node
        known = set(node.GetParameterNames())
        for name, (t, _, default) in fields.items():
            if not _is_node_type(t) and name not in known:
                set_(self, name, default)

    def connectGui(self, ui):
        bound = []
        for widget in vars(ui).values():
            name = widget.property("SlicerParameterName")
            if not name:
                continue
            t, choice, _ = fields[name]
            if not CONNECTABLE.get(widget.cls, lambda *a: False)(t, choice):
                raise RuntimeError(f"Slicer has no connector for {widget.cls} and {name}: {t}")
            if choice is not None:
                widget.clear()
                for c in choice.choices:
                    widget.addItem(str(c))
            bound.append((widget, name, choice))
        state = {"writing": False}

        def to_gui(*args):
            state["writing"] = True
            for widget, name, choice in bound:
                value = getattr(self, name)
                if widget.cls == "QCheckBox":
                    widget.checked = value
                elif widget.cls == "qMRMLNodeComboBox":
                    widget.setCurrentNode(value)
                elif choice is not None:
                    widget.currentIndex = choice.choices.index(value)
                else:
                    widget.text = value
            state["writing"] = False

        def from_gui(widget, name, choice):
            if state["writing"]:
                return
            value = (widget.checked if widget.cls == "QCheckBox" else widget.currentNode()
                     if widget.cls == "qMRMLNodeComboBox" else choice.choices[widget.currentIndex] if choice else widget.text)
            setattr(self, name, value)

        to_gui()
        slots = [(widget, lambda w=widget, n=name, c=choice: from_gui(w, n, c)) for widget, name, choice in bound]
        for widget, slot in slots:
            widget.connect("changed", slot)
        return self.parameterNode.AddObserver("ModifiedEvent", to_gui), slots

    def disconnectGui(self, tag):
        observer, slots = tag
        self.parameterNode.RemoveObserver(observer)
        for widget, slot in slots:
            widget._listeners.remove(slot)

    cls.__init__, cls.connectGui, cls.disconnectGui = init, connectGui, disconnectGui
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback, priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    cls.allParameters = fields
    return cls


# ---------------------------------------------------------------- the rest of the application


class FakeTimer:
    def __init__(self):
        self.active, self.interval, self.slots = False, None, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def install(monkeypatch, module_dir):
    """Put the stand-ins in sys.modules / slicer; returns a record of what the module asked the app to do."""
    import sys

    record = types.SimpleNamespace(errors=[], samples=[], connections=[], confirms=[], file_answers=[])
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class Logic:
        def __init__(self, parent=None):
            self.moduleName = "BrainID"

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode("BrainID", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("BrainID")
                node = slicer.mrmlScene.AddNode(node)
            return node

    class Widget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)

        def setup(self):
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def resourcePath(self, relative):
            return str(module_dir / "Resources" / relative)

    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, p: setattr(self, "parent", p)})
    slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleWidget = Logic, Widget
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.Choice, pnw.parameterNodeWrapper = Choice, parameterNodeWrapper
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(ToolTipRole=3)
    qt.QTimer = FakeTimer
    qt.QFileDialog = types.SimpleNamespace(getSaveFileName=lambda *a: record.file_answers.pop(0),
                                           getOpenFileName=lambda *a: record.file_answers.pop(0))
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: record.samples.append(kw))
    for name, module in (("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw), ("qt", qt),
                         ("SampleData", sample_data)):
        monkeypatch.setitem(sys.modules, name, module)

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded like Slicer's error popup
            record.errors.append(f"{message} {e}")

    ui_widget = types.SimpleNamespace(setMRMLScene=lambda scene: None, path=None)
    for name, value in (("tryWithErrorDisplay", try_with_error_display),
                        ("errorDisplay", lambda text, **kw: record.errors.append(text)),
                        ("confirmOkCancelDisplay", lambda text, **kw: record.confirms.append(text) or True),
                        ("loadUI", lambda path: setattr(ui_widget, "path", path) or ui_widget),
                        ("childWidgetVariables", lambda w: widgets_from_ui(w.path))):
        monkeypatch.setattr(slicer.util, name, value, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda sig, fn: record.connections.append((sig, fn))),
                        raising=False)
    return record
